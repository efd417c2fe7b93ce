"""Learning against forgetting: the Pareto front of held-out loss and forgetting, and what it says.

Every trial that runs to the end measures both sides of fine-tuning: its held-out loss (what it learned)
and its forgetting, the change of the mean per-token NLL on a fixed reference text that is not training
data (nats; ``exp(forgetting)`` is the factor on the base model's perplexity on that text). A trial is on
the front when no other trial is at least as good on both and better on one. Biderman et al. 2024
("LoRA Learns Less and Forgets Less") compare tuning methods by exactly these fronts.

A method's front is read as a staircase: at a held-out loss L, the least forgetting among its trials that
reached L or lower. Two methods are compared only where both fronts reach, never by extrapolation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

from sweeps.results.analysis import methods
from sweeps.results.edges import lr_text
from sweeps.results.records import TrialRecord
from trainer.methods import METHODS

SAME = 0.01  # nats: forgetting differences below this are read as "the same"


@dataclass(frozen=True)
class Point:
    """One finished trial on the trade-off plane."""

    record: TrialRecord
    loss: float  # final held-out loss
    forgetting: float  # reference-text NLL change, nats


def finished(r: TrialRecord) -> bool:
    """A trial that ran to the end: what export ranks and the front is made of (never pruned, diverged, failed)."""
    return r.outcome not in ("pruned", "diverged", "failed", "unfinished") and r.final.get("status") == "completed"


def points(records: list[TrialRecord]) -> list[Point]:
    """Finished trials with both measures (a stopped trial never measured its forgetting). The loss is the one
    measured, not capped at l0 as on the map: it is what Optuna was told and what export compares."""
    out = []
    for r in records:
        loss, forgetting = r.final.get("eval_loss"), r.final.get("forgetting")
        if finished(r) and is_number(loss) and is_number(forgetting):
            out.append(Point(r, float(loss), float(forgetting)))
    return out


def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """a is at least as good as b on every objective (all minimized) and better on one."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated(items: list, key) -> list:
    """The items that no other item dominates; ``key(item)`` gives its objectives, all minimized."""
    return [i for i in items if not any(dominates(key(j), key(i)) for j in items if j is not i)]


def front(pts: list[Point]) -> list[Point]:
    """The non-dominated points (lower loss and lower forgetting are better), by increasing loss."""
    return sorted(non_dominated(pts, lambda p: (p.loss, p.forgetting)), key=lambda p: (p.loss, p.forgetting))


def fronts_by_method(pts: list[Point]) -> dict[str, list[Point]]:
    return {m: front([p for p in pts if p.record.method == m]) for m in methods([p.record for p in pts])}


def least_forgetting(method_front: list[Point], loss: float) -> float | None:
    """The staircase: the least forgetting among front points with held-out loss <= ``loss``."""
    reached = [p.forgetting for p in method_front if p.loss <= loss]
    return min(reached) if reached else None


def ppl_factor(forgetting: float) -> float:
    """The factor on the base model's perplexity on the reference text: exp(NLL change)."""
    return math.exp(forgetting)


def label(r: TrialRecord, keys: list[str] | None = None) -> str:
    """'full lr 1e-3 bs 8' with the other searched settings that vary (``keys``)."""
    parts = [r.method, f"lr {lr_text(r.learning_rate)}"]
    short = {"batch_size": "bs", "epochs": "epochs", "lora_r": "r"}
    others = {k for m in METHODS.values() if m.name != r.method for k in m.settings}  # settings r's method ignores
    for key in keys or []:
        if key in others:
            continue
        if r.config.get(key) is not None:
            parts.append(f"{short.get(key, key)} {_g(r.config[key])}")
    return " ".join(parts)


def varied_keys(records: list[TrialRecord]) -> list[str]:
    """The label's settings that differ between trials (batch size, epochs, LoRA rank)."""
    return [k for k in ("batch_size", "epochs", "lora_r") if len({str(r.config.get(k)) for r in records}) > 1]


def findings(records: list[TrialRecord]) -> list[str]:
    """The front in words, each pair of methods at equal held-out loss, and the best-loss trial's forgetting."""
    pts = points(records)
    if not pts:
        return []
    keys = varied_keys(records)
    overall = front(pts)
    shown = "; ".join(f"{label(p.record, keys)}: loss {p.loss:.2f}, forgetting {p.forgetting:+.2f}" for p in overall)
    out = [f"trade-off front (held-out loss against forgetting, {len(overall)} of {len(pts)} finished trials; "
           f"lower is better on both): {shown}"]
    by_method = fronts_by_method(pts)
    for a, b in combinations(by_method, 2):
        out.append(compare(a, by_method[a], b, by_method[b]))
    best = min(pts, key=lambda p: (p.loss, p.forgetting))
    out.append(_best_loss_words(best, keys))
    return out


def compare(a: str, front_a: list[Point], b: str, front_b: list[Point]) -> str:
    """How much less one method forgot than the other at equal held-out loss, where both fronts reach."""
    lo = max(front_a[0].loss, front_b[0].loss)
    hi = min(front_a[-1].loss, front_b[-1].loss)
    if lo > hi:
        return (f"{a} vs {b}: their fronts share no held-out loss ({a} {_span(front_a)}, {b} {_span(front_b)}), "
                "so they cannot be compared at equal loss")
    at = sorted({p.loss for p in front_a + front_b if lo <= p.loss <= hi})
    diffs = [(x, least_forgetting(front_a, x) - least_forgetting(front_b, x)) for x in at]  # > 0: a forgot more
    pieces = []
    for sign, run in _runs(diffs):
        start, end = run[0][0], _next_start(diffs, run) or hi
        where = f"at held-out loss {start:.2f}" if start == end else f"at held-out loss {start:.2f} to {end:.2f}"
        sizes = [abs(d) for _, d in run]
        if sign == 0:
            pieces.append(f"{where} both forgot about the same (within {SAME} nats)")
            continue
        less, more = (b, a) if sign > 0 else (a, b)
        amount = _range(min(sizes), max(sizes))
        factor = _range(ppl_factor(min(sizes)), ppl_factor(max(sizes)), "{:.2f}x")
        pieces.append(f"{where} {less} forgot {amount} nats less than {more} (reference perplexity {factor} lower)")
    return f"{a} vs {b}, read off their fronts where both reach: " + "; ".join(pieces)


def _runs(diffs: list[tuple[float, float]]) -> list[tuple[int, list[tuple[float, float]]]]:
    """Consecutive breakpoints grouped by who forgot less (+1: the second method, -1: the first, 0: neither)."""
    out: list[tuple[int, list]] = []
    for x, d in diffs:
        sign = 0 if abs(d) < SAME else (1 if d > 0 else -1)
        if out and out[-1][0] == sign:
            out[-1][1].append((x, d))
        else:
            out.append((sign, [(x, d)]))
    return out


def _next_start(diffs, run) -> float | None:
    i = diffs.index(run[-1]) + 1
    return diffs[i][0] if i < len(diffs) else None


def _best_loss_words(best: Point, keys: list[str]) -> str:
    factor = ppl_factor(best.forgetting)
    if best.forgetting >= 0:
        effect = f"its perplexity on the reference text is {factor:.2f}x the base model's"
    else:
        effect = f"it fits the reference text better than the base model (perplexity {factor:.2f}x)"
    return (f"the lowest held-out loss ({label(best.record, keys)}: {best.loss:.3f}) forgot "
            f"{best.forgetting:+.2f} nats: {effect}")


def _span(f: list[Point]) -> str:
    return f"{f[0].loss:.2f}" if len(f) == 1 else f"{f[0].loss:.2f} to {f[-1].loss:.2f}"


def _range(lo: float, hi: float, fmt: str = "{:.2f}") -> str:
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)} to {fmt.format(hi)}"


def best_record(records: list[TrialRecord], mode: str = "min", method: str | None = None) -> TrialRecord | None:
    """The best completed trial (pruned, diverged, failed and unfinished trials never count)."""
    ok = [r for r in records if finished(r) and r.objective is not None and (method is None or r.method == method)]
    if not ok:
        return None
    return (min if mode == "min" else max)(ok, key=lambda r: r.objective)


def _g(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def is_number(value) -> bool:
    """A finite int or float (not a bool, not None)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
