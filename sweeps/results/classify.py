"""Curve classification: what happened to each trial, with the evidence in words and numbers.

The rules live once, in ``trainer.curves``, with the thresholds of the sweep's spec (``Thresholds``): the
divergence that the map shows is the rule that stopped the trial. Checked in this order:

1. failed: the trial process failed, or the trainer reported status failed (e.g. out of memory).
2. pruned: stopped by the sweep's rule (median, successive halving, ...) before it finished; but if
   its training loss had blown up (a raw loss above ``factor`` x the lowest before it, or an end above
   ``ROSE`` x its first report), diverged.
3. diverged: the *training* loss blew up: stopped by the divergence rule, the trainer's own stop,
   a non-finite loss, the smoothed loss above ``factor`` x its running minimum, or one loss above
   ``spike`` x the largest before it.
4. unfinished: the sweep was interrupted while the trial ran (``--resume`` finishes it).
5. overfit: the training loss fell, but the held-out loss rose clearly above its own minimum or
   ended at or above the base model's l0: overfitting, or train data that does not match the eval
   data. Not divergence: the cure is fewer epochs, a lower LR, or eval data drawn like the training data.
6. oscillating: >= ``min_spikes`` loss spikes in the last quarter, or the smoothed loss ending
   above ``rebound`` x its minimum.
7. slow: it learned little: under ``low_gain`` of l0, or under ``low_share`` of its method's best
   gain in the sweep, whether or not a short curve still looks like it is falling: the LR is too
   low (or the run too short) for this budget.
8. converged: it learned and settled.
"""
from __future__ import annotations

from sweeps.results.records import TrialRecord
from trainer import curves
from trainer.curves import Thresholds

ROSE = 1.3  # a pruned curve ending > 1.3x its first report's loss was diverging, not merely behind


def classify_all(records: list[TrialRecord], thresholds: Thresholds | None = None) -> None:
    """Set ``outcome`` and ``evidence`` on every record (each method's best gain is taken over the sweep)."""
    t = thresholds or Thresholds()
    best: dict[str, float] = {}
    for r in records:
        g = _gain(r)
        if g is not None and not _failed(r) and r.final.get("done"):
            best[r.method] = max(best.get(r.method, g), g)
    for record in records:
        record.outcome, record.evidence = classify(record, best_gain=best.get(record.method), thresholds=t)


def classify(record: TrialRecord, *, best_gain: float | None, thresholds: Thresholds | None = None) -> tuple[str, str]:
    """The outcome of one trial and the evidence for it, in words with the numbers."""
    t = thresholds or Thresholds()
    if _failed(record):
        return "failed", record.error or record.final.get("reason") or "the trial failed"
    stop = record.stopped_by or ""
    losses = [h.get("train_loss") for h in record.history]
    if stop.startswith("pruned"):
        rose = _rose(record, losses, t)  # stopped by the rule, but the training loss itself had blown up
        return ("diverged", f"{rose} ({stop})") if rose else ("pruned", stop)
    if stop.startswith("diverged"):
        return "diverged", stop.removeprefix("diverged: ")
    if record.final.get("status") == "diverged":
        return "diverged", record.final.get("reason") or "the trainer stopped on a non-finite loss"
    smoothed = _smoothed(record, losses)
    hit = curves.first_divergence(losses, smoothed, t)
    if hit:
        i, reason = hit
        return "diverged", f"{reason} at {_seen(record, i)}"
    if not record.final.get("done"):  # the sweep was interrupted (Ctrl-C, a killed driver) while it ran
        seen = record.history[-1].get("examples_seen") if record.history else 0
        return "unfinished", f"interrupted at {seen} examples; --resume finishes it"
    verdict = curves.overfit(losses, _evals(record), _l0(record), t)
    if verdict:
        return "overfit", verdict
    verdict = _oscillating(record, losses, smoothed, t)
    if verdict:
        return "oscillating", verdict
    gain = _gain(record)
    verdict = curves.low_gain(gain, best_gain, t)
    if verdict:
        return "slow", f"{verdict}: the LR is too low (or the run too short) for this budget"
    final = record.final.get("eval_loss", float("nan"))
    return "converged", (f"eval loss {final:.3f} from l0 {_l0(record):.3f} (gained {gain:.0%} of l0)"
                         if gain is not None else "finished without a sign of trouble")


def _rose(record: TrialRecord, losses: list[float | None], t: Thresholds) -> str | None:
    """A run stopped by the rule whose training loss was getting worse, not slower: a raw loss rose above ``factor`` x
    the lowest before it (a pruned curve is too short for the smoothed rule to see it), or it ended above ``ROSE`` x
    where it started."""
    low = None
    for i, value in enumerate(losses):
        if value is None:
            continue
        if low is not None and low > 0 and value > t.factor * low:
            return f"train loss rose to {value:.2f}, {value / low:.1f}x its minimum before ({low:.2f}), at {_seen(record, i)}"
        low = value if low is None else min(low, value)
    seen = [v for v in losses if v is not None]
    if len(seen) >= 2 and seen[0] > 0 and seen[-1] > ROSE * seen[0]:
        return f"train loss rose from {seen[0]:.2f} to {seen[-1]:.2f}"
    return None


def _failed(r: TrialRecord) -> bool:
    return bool(r.error) or r.final.get("status") == "failed"


def _l0(r: TrialRecord) -> float | None:
    value = r.final.get("l0")
    if value is None:
        value = next((h.get("l0") for h in r.history if h.get("l0") is not None), None)
    return value


def _gain(r: TrialRecord) -> float | None:
    return curves.gain(_l0(r), r.final.get("eval_loss"))


def _evals(r: TrialRecord) -> list[tuple[int, float]]:
    """(examples seen, held-out loss) in order, ending with the final eval."""
    out = [(h.get("examples_seen", 0), h["eval_loss"]) for h in r.history if h.get("eval_loss") is not None]
    final = r.final.get("eval_loss")
    if final is not None and (not out or out[-1][1] != final):
        out.append((r.final.get("examples_seen", out[-1][0] if out else 0), final))
    return out


def _smoothed(record: TrialRecord, losses: list[float | None]) -> list[float | None]:
    given = [h.get("train_loss_ema") for h in record.history]
    if given and all(v is not None for v in given):
        return given
    if all(v is not None for v in losses):
        return curves.smooth(losses)
    return [None] * len(losses)


def _seen(record: TrialRecord, i: int) -> str:
    if i < len(record.history) and record.history[i].get("examples_seen") is not None:
        return f"{record.history[i]['examples_seen']} examples"
    return f"report {i + 1}"


def _oscillating(record: TrialRecord, losses: list[float], smoothed: list[float], t: Thresholds) -> str | None:
    found = curves.spikes(losses, t)
    if len(found) >= t.min_spikes:
        return f"{len(found)} loss spikes in the last quarter (from {_seen(record, found[0])})"
    hit = curves.rebound(smoothed, t)
    if hit:
        low, ratio = hit
        return f"smoothed loss ended {ratio:.2f}x its minimum (reached at {_seen(record, low)}): it rebounded"
    return None
