"""Per-method measures over a classified sweep, and the diagnosis in plain words.

- Stable LR window: from the lowest LR whose final eval loss is within ``margin`` (relative) of
  the method's best, up to the highest LR that did not diverge.
- LR sensitivity (Wortsman et al. 2023): the mean over the method's LRs of
  min(final loss, l0) - best final loss. Trials at one LR (several batch sizes) are averaged
  first. Lower = more forgiving.
"""
from __future__ import annotations

import math
from collections import defaultdict
from statistics import mean

from sweeps.records import TrialRecord

METHOD_ORDER = ("full", "lora", "last_layer")


def methods(records: list[TrialRecord]) -> list[str]:
    seen = {r.method for r in records}
    return [m for m in METHOD_ORDER if m in seen] + sorted(seen - set(METHOD_ORDER))


def final_loss(r: TrialRecord) -> float | None:
    """min(final eval loss, l0) for finished or stopped trials; None for failed ones and never-evaluated ones."""
    if r.outcome == "failed":
        return None
    if r.outcome == "pruned" and not any(h.get("eval_loss") is not None for h in r.history):
        return None
    value = r.final.get("eval_loss", r.objective)
    l0 = r.final.get("l0")
    if value is None or not math.isfinite(value):
        return l0
    return min(value, l0) if l0 is not None else value


def _of(records, method):
    return [r for r in records if r.method == method and r.outcome != "failed"]


def best_trial(records: list[TrialRecord], method: str) -> TrialRecord | None:
    ok = [r for r in _of(records, method) if r.outcome not in ("diverged", "pruned") and final_loss(r) is not None]
    return min(ok, key=final_loss) if ok else None


def best_lr(records: list[TrialRecord], method: str) -> float | None:
    best = best_trial(records, method)
    return best.learning_rate if best else None


def stable_window(records: list[TrialRecord], method: str, margin: float = 0.05) -> tuple[float, float] | None:
    best = best_trial(records, method)
    if best is None:
        return None
    target = final_loss(best) * (1 + margin)
    good = [r.learning_rate for r in _of(records, method)
            if r.outcome not in ("diverged", "pruned") and final_loss(r) is not None and final_loss(r) <= target]
    not_diverged = [r.learning_rate for r in _of(records, method) if r.outcome != "diverged"]
    low = min(good)
    high = max([lr for lr in not_diverged if lr >= low], default=low)
    return low, high


def lr_sensitivity(records: list[TrialRecord], method: str) -> float | None:
    trials = [r for r in _of(records, method) if final_loss(r) is not None]
    if not trials:
        return None
    best = min(final_loss(r) for r in trials)
    per_lr = defaultdict(list)
    for r in trials:
        per_lr[r.learning_rate].append(final_loss(r) - best)
    return mean(mean(v) for v in per_lr.values())


def diagnose(records: list[TrialRecord]) -> list[str]:
    """Findings backed by the measurements: why isn't it learning, where is it stable."""
    findings: list[str] = []
    if not records:
        return ["no trials in this sweep"]
    for method in methods(records):
        findings.extend(_method_findings(records, method))
    findings.extend(_too_low(records))
    findings.extend(_overfitting(records))
    findings.extend(_forgetting(records))
    findings.extend(_batch_tolerance(records))
    return findings


def _fmt(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-").replace("e+0", "e+")


def _method_findings(records, method) -> list[str]:
    mine = [r for r in records if r.method == method]
    failed = [r for r in mine if r.outcome == "failed"]
    alive = [r for r in mine if r.outcome != "failed"]
    if not alive:
        return [f"{method}: all {len(mine)} trial(s) failed ({failed[0].evidence or failed[0].error})"]
    parts = []
    diverged = sorted(r.learning_rate for r in alive if r.outcome == "diverged")
    if diverged and len(diverged) == len(alive):
        return [f"{method}: every trial diverged ({len(diverged)}/{len(alive)}), even at lr {_fmt(min(diverged))}: "
                "lower the learning-rate range"]
    if diverged:
        low = min(diverged)
        above = [r for r in alive if r.learning_rate >= low]
        parts.append(f"diverged at lr >= {_fmt(low)} ({sum(r.outcome == 'diverged' for r in above)}/{len(above)} trials)")
    osc = sorted({r.learning_rate for r in alive if r.outcome == "oscillating"})
    if osc:
        parts.append("oscillating at " + ", ".join(_fmt(x) for x in osc))
    window = stable_window(records, method)
    if window:
        parts.append(f"stable window {_fmt(window[0])} to {_fmt(window[1])}")
    best = best_trial(records, method)
    if best:
        parts.append(f"best lr {_fmt(best.learning_rate)} (eval loss {final_loss(best):.3f}, l0 {best.final.get('l0', float('nan')):.3f})")
    sens = lr_sensitivity(records, method)
    if sens is not None:
        parts.append(f"LR sensitivity {sens:.2f}")
    if not parts:  # e.g. every trial pruned before its first eval: say so rather than print an empty finding
        counts: dict[str, int] = defaultdict(int)
        for r in alive:
            counts[r.outcome or "unclassified"] += 1
        parts.append("no trial reached an eval loss (" + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())) + ")")
    if failed:
        parts.append(f"{len(failed)} failed")
    return [f"{method}: " + "; ".join(parts)]


def _too_low(records) -> list[str]:
    l0s = [r.final.get("l0") for r in records if r.final.get("l0") is not None]
    losses = [final_loss(r) for r in records if final_loss(r) is not None]
    if not l0s or not losses:
        return []
    achievable = max(l0s) - min(losses)
    if achievable <= 0:
        return ["no trial lowered the eval loss below the base model's: nothing was learned in this budget"]
    out = []
    for method in methods(records):
        slow = [r for r in records if r.method == method and r.outcome in ("slow", "converged", "pruned")
                and final_loss(r) is not None and (r.final.get("l0", 0) - final_loss(r)) < 0.1 * achievable]
        if slow:
            top = max(r.learning_rate for r in slow)
            low_side = [r for r in records if r.method == method and r.learning_rate <= top]
            if all(r in slow or r.outcome == "failed" for r in low_side):
                out.append(f"{method}: lr <= {_fmt(top)} learned < 10% of the achievable loss drop in budget: too low for this budget")
    return out


def _overfitting(records) -> list[str]:
    out = []
    for r in records:
        evals = [(h["examples_seen"], h["eval_loss"]) for h in r.history if h.get("eval_loss") is not None]
        trains = [h.get("train_loss_ema") for h in r.history if h.get("train_loss_ema") is not None]
        if len(evals) >= 3 and len(trains) >= 3 and r.outcome in ("converged", "slow", "oscillating"):
            low = min(range(len(evals)), key=lambda i: evals[i][1])
            if low < len(evals) - 1 and evals[-1][1] > evals[low][1] * 1.02 and trains[-1] < trains[len(trains) // 2]:
                out.append(f"{r.method} lr {_fmt(r.learning_rate)} bs {r.config.get('batch_size')}: eval loss rose after "
                           f"{evals[low][0]} examples while train loss fell: overfitting")
    return out[:5]


def _forgetting(records) -> list[str]:
    parts = []
    for method in methods(records):
        best = best_trial(records, method)
        if best and best.final.get("forgetting") is not None:
            parts.append(f"{method} {best.final['forgetting']:+.2f}")
    if not parts:
        return []
    return ["forgetting (reference-text NLL change, nats, at each method's best LR): " + "; ".join(parts)]


def _batch_tolerance(records) -> list[str]:
    out = []
    for method in methods(records):
        by_bs = defaultdict(list)
        for r in records:
            if r.method == method and r.outcome not in ("failed",) and "batch_size" in r.config:
                by_bs[r.config["batch_size"]].append(r)
        if len(by_bs) < 2:
            continue
        highest = {}
        for bs, rs in by_bs.items():
            ok = [r.learning_rate for r in rs if r.outcome != "diverged"]
            if ok and any(r.outcome == "diverged" for r in rs):
                highest[bs] = max(ok)
        if len(highest) >= 2:
            (b1, l1), (b2, l2) = sorted(highest.items())[0], sorted(highest.items())[-1]
            if l2 > l1:
                out.append(f"{method}: batch size {b2} tolerated {l2 / l1:.0f}x higher LR than batch size {b1}")
            elif l1 > l2:
                out.append(f"{method}: batch size {b1} tolerated {l1 / l2:.0f}x higher LR than batch size {b2}")
    return out
