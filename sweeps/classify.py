"""Curve classification: converged, slow, oscillating, diverged, pruned or failed, with the evidence.

Criteria (DESIGN.md; thresholds calibrated on lr.yaml's curves), checked in order:

1. failed: the trial process failed or the trainer reported status failed (e.g. out of memory).
2. pruned: stopped by the sweep's rule (median, successive halving, ...) before it finished;
   but if its loss had already risen above ``ROSE`` x its first report, it is diverged.
3. diverged: stopped by the divergence rules; a non-finite loss; the smoothed loss above
   ``DIVERGE_FACTOR`` x its running minimum (fastai and Lightning LR finders use 4); one report's
   loss above ``SPIKE_FACTOR`` x the largest loss before it (Megatron's spiky-loss factor, 10);
   or a final eval loss at or above the base model's l0 (training made it worse).
4. oscillating: at least ``MIN_SPIKES`` spikes in the last quarter of the curve (a report's loss
   >= ``SPIKE_RATIO`` x the mean of the preceding window, as in LLM Foundry's loss-spike callback,
   or > mean + ``SPIKE_SIGMA`` sigma, as in OLMo-core), or the smoothed loss ending above
   ``REBOUND`` x its minimum (it bounced back up).
5. slow: the relative gain (l0 - final) / l0 is below ``SLOW_SHARE`` of the best trial's gain
   while the tail of the smoothed curve is still clearly falling (by more than ``FALLING`` of l0
   over its last third): the budget ran out before the learning rate did its work.
6. converged: otherwise.
"""
from __future__ import annotations

import math
from statistics import mean, pstdev

from sweeps.records import TrialRecord

EMA_BETA = 0.98  # smoothing of the train loss (fastai, Lightning), bias-corrected
DIVERGE_FACTOR = 4.0  # smoothed loss > 4x its running minimum (fastai/Lightning LR finders)
SPIKE_FACTOR = 10.0  # one loss > 10x the largest seen so far (Megatron)
SPIKE_RATIO = 2.0  # a spike: loss >= 2x the mean of the preceding window (LLM Foundry)
SPIKE_SIGMA = 6.0  # ... or > mean + 6 sigma of that window (OLMo-core)
SPIKE_WINDOW = 8  # reports in the preceding window
MIN_SPIKES = 3  # spikes in the last quarter that make a curve oscillating
REBOUND = 1.1  # smoothed loss ending > 1.1x its minimum
SLOW_SHARE = 0.25  # gain below a quarter of the best trial's gain ...
FALLING = 0.02  # ... while the smoothed tail still falls by > 2% of l0
ROSE = 1.3  # a pruned curve ending > 1.3x its first report's loss was diverging, not merely behind


def classify_all(records: list[TrialRecord]) -> None:
    """Set ``outcome`` and ``evidence`` on every record (the best gain is taken over the sweep)."""
    gains = [g for g in (_gain(r) for r in records if not _failed(r)) if g is not None]
    best = max(gains) if gains else None
    for record in records:
        record.outcome, record.evidence = classify(record, best_gain=best)


def classify(record: TrialRecord, *, best_gain: float | None) -> tuple[str, str]:
    """The outcome of one trial and the evidence for it, in words with the numbers."""
    if _failed(record):
        return "failed", record.error or record.final.get("reason") or "the trial failed"
    stop = record.stopped_by or ""
    if stop.startswith("pruned"):
        rose = _rose(record)  # stopped by the rule, but the curve itself was already going up
        return ("diverged", f"{rose} ({stop})") if rose else ("pruned", stop)
    if stop.startswith("diverged"):
        return "diverged", stop.removeprefix("diverged: ")
    if record.final.get("status") == "diverged":
        return "diverged", record.final.get("reason") or "the trainer stopped on a non-finite loss"
    losses = [h.get("train_loss") for h in record.history]
    if any(v is None for v in losses) and losses:
        return "diverged", "a non-finite train loss"
    losses = [v for v in losses if v is not None]
    smooth = _smoothed(record, losses)
    verdict = _diverged(record, losses, smooth)
    if verdict:
        return "diverged", verdict
    if not record.final.get("done"):  # the sweep was interrupted (Ctrl-C, a killed driver) while it ran
        seen = record.history[-1].get("examples_seen") if record.history else 0
        return "unfinished", f"interrupted at {seen} examples; --resume finishes it"
    verdict = _oscillating(record, losses, smooth)
    if verdict:
        return "oscillating", verdict
    verdict = _slow(record, smooth, best_gain)
    if verdict:
        return "slow", verdict
    gain = _gain(record)
    return "converged", (f"eval loss {record.final.get('eval_loss', float('nan')):.3f} from l0 {_l0(record):.3f} "
                         f"(gained {gain:.0%} of l0)" if gain is not None else "finished without a sign of trouble")


def _rose(record: TrialRecord) -> str | None:
    """A stopped run that was getting worse, not slower: its curve ended above ``ROSE`` x where it started,
    or its last held-out loss was no better than the base model's l0."""
    losses = [h.get("train_loss") for h in record.history if h.get("train_loss") is not None]
    if len(losses) >= 2 and losses[0] > 0 and losses[-1] > ROSE * losses[0]:
        return f"loss rose from {losses[0]:.2f} to {losses[-1]:.2f}"
    evals = [h for h in record.history if h.get("eval_loss") is not None]
    l0 = _l0(record)
    if evals and l0 is not None and evals[-1]["eval_loss"] >= l0:
        last = evals[-1]
        return f"eval loss {last['eval_loss']:.2f} >= base {l0:.2f} at {last.get('examples_seen', '?')} examples"
    return None


def _failed(r: TrialRecord) -> bool:
    return bool(r.error) or r.final.get("status") == "failed"


def _l0(r: TrialRecord) -> float | None:
    value = r.final.get("l0")
    if value is None:
        value = next((h.get("l0") for h in r.history if h.get("l0") is not None), None)
    return value


def _gain(r: TrialRecord) -> float | None:
    l0, final = _l0(r), r.final.get("eval_loss")
    if l0 is None or final is None or l0 <= 0 or not math.isfinite(final):
        return None
    return (l0 - final) / l0


def _smoothed(record: TrialRecord, losses: list[float]) -> list[float]:
    given = [h.get("train_loss_ema") for h in record.history]
    if given and all(v is not None for v in given):
        return given
    out, ema = [], 0.0
    for n, value in enumerate(losses, start=1):
        ema = EMA_BETA * ema + (1 - EMA_BETA) * value
        out.append(ema / (1 - EMA_BETA**n))
    return out


def _seen(record: TrialRecord, i: int) -> str:
    if i < len(record.history) and record.history[i].get("examples_seen") is not None:
        return f"{record.history[i]['examples_seen']} examples"
    return f"report {i + 1}"


def _diverged(record: TrialRecord, losses: list[float], smooth: list[float]) -> str | None:
    running = math.inf
    for i, value in enumerate(smooth):
        running = min(running, value)
        if value > DIVERGE_FACTOR * running:
            return f"smoothed loss {value / running:.1f}x its minimum at {_seen(record, i)}"
    for i in range(1, len(losses)):
        top = max(losses[:i])
        if top > 0 and losses[i] > SPIKE_FACTOR * top:
            return f"loss jumped to {losses[i]:.3g}, {losses[i] / top:.0f}x the largest before it, at {_seen(record, i)}"
    l0, final = _l0(record), record.final.get("eval_loss")
    if l0 is not None and final is not None and record.final.get("done") and final >= l0:
        return f"eval loss {final:.3f} >= base {l0:.3f}: training made it worse"
    return None


def _oscillating(record: TrialRecord, losses: list[float], smooth: list[float]) -> str | None:
    start = len(losses) - max(1, len(losses) // 4)
    spikes = []
    for i in range(max(start, 2), len(losses)):
        window = losses[max(0, i - SPIKE_WINDOW) : i]
        m, s = mean(window), pstdev(window) if len(window) > 1 else 0.0
        if losses[i] >= SPIKE_RATIO * m or (s > 0 and losses[i] > m + SPIKE_SIGMA * s):
            spikes.append(i)
    if len(spikes) >= MIN_SPIKES:
        return f"{len(spikes)} loss spikes in the last quarter (from {_seen(record, spikes[0])})"
    if smooth and min(smooth) > 0 and smooth[-1] > REBOUND * min(smooth):
        low = smooth.index(min(smooth))
        return f"smoothed loss ended {smooth[-1] / min(smooth):.2f}x its minimum (reached at {_seen(record, low)}): it rebounded"
    return None


def _slow(record: TrialRecord, smooth: list[float], best_gain: float | None) -> str | None:
    gain, l0 = _gain(record), _l0(record)
    if gain is None or best_gain is None or best_gain <= 0 or l0 is None or len(smooth) < 3:
        return None
    tail = smooth[-max(2, len(smooth) // 3) :]
    falling = (tail[0] - tail[-1]) / l0
    if gain < SLOW_SHARE * best_gain and falling > FALLING:
        return f"gained {gain:.0%} of l0 vs the best trial's {best_gain:.0%}, and still falling: too slow for this budget"
    return None
