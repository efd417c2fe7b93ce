"""Per-method measures over a classified sweep, and the diagnosis in plain words.

- Window, per group (a method at one batch size, or whatever else was searched): where it learns well (the LRs
  whose trials converged within ``MARGIN`` of the group's best held-out loss, in unbroken runs of tried LRs), where
  instability starts (the lowest LR that oscillated or diverged) and where it diverges (``sweeps.results.edges``). No range
  called good holds an oscillating or diverged trial. Stated only for groups with ``MIN_LRS`` LRs or more.
- Comparisons (LoRA's best LR against full fine-tuning's, how the edge moves with batch size) only between groups
  whose best trial converged, with ``MIN_LRS`` LRs each; otherwise the finding says why it is not stated.
- LR sensitivity (Wortsman et al. 2023): the mean over the method's LRs of
  min(final loss, l0) - best final loss. Trials at one LR (several batch sizes) are averaged
  first. Lower = more forgiving.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from statistics import mean

from sweeps.results import edges
from sweeps.results.records import OUTCOMES as OUTCOME_ORDER
from sweeps.results.records import TrialRecord
from trainer import curves
from trainer.config import MIN_EVAL_RECORDS
from trainer.methods import METHODS

METHOD_ORDER = tuple(METHODS)  # the registry's order
MARGIN = 0.05  # "learns well": a converged trial within 5% of its group's best held-out loss
MIN_LRS = 3  # an edge, a window or a ratio rests on at least this many learning rates of a group
MIN_EVAL = MIN_EVAL_RECORDS  # fewer held-out records than this and every held-out verdict rests on a handful: said so
UNSTABLE = ("oscillating", "diverged")


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
    """The method's lowest final eval loss among trials that ran to the end (an overfit one counts: it is what was measured)."""
    ok = [r for r in _of(records, method) if r.outcome not in ("diverged", "pruned", "unfinished") and final_loss(r) is not None]
    return min(ok, key=final_loss) if ok else None


def best_lr(records: list[TrialRecord], method: str) -> float | None:
    best = best_trial(records, method)
    return best.learning_rate if best else None


@dataclass(frozen=True)
class Window:
    """What one group's trials show along the learning rate (see the module docstring)."""

    best: TrialRecord | None  # the lowest final held-out loss among trials that ran to the end
    well: list[tuple[float, float]]  # unbroken runs of tried LRs whose trials all converged within the margin
    unstable: float | None  # the lowest LR with a trial that oscillated or diverged
    unstable_how: str | None  # how it was unstable there: oscillating or diverged
    converged_above: float | None  # a converged LR above ``unstable``: the instability is not monotonic in LR
    edge: edges.Edge | None
    n_lrs: int

    def text(self, margin: float = MARGIN) -> str:
        parts = []
        if self.best is None:
            parts.append("no trial ran to its end")
        elif self.well:
            runs = ", ".join(_fmt(lo) if lo == hi else f"{_fmt(lo)} to {_fmt(hi)}" for lo, hi in self.well)
            parts.append(f"learns well at {runs} (converged within {margin:.0%} of its best held-out loss, "
                         f"{final_loss(self.best):.3f})")
        else:
            parts.append(f"learns well nowhere: no trial converged within {margin:.0%} of its best held-out loss "
                         f"({final_loss(self.best):.3f} at {_fmt(self.best.learning_rate)}, {self.best.outcome})")
        if self.unstable is not None:
            above = (f", though {_fmt(self.converged_above)} above it converged" if self.converged_above else "")
            parts.append(f"instability starts at {_fmt(self.unstable)} ({self.unstable_how}{above})")
        elif self.edge and self.edge.below:
            parts.append(f"no instability up to {_fmt(self.edge.below)}")
        if self.edge and self.edge.above:
            parts.append(self.edge.text())
        return "; ".join(parts)


def window(trials: list[TrialRecord], margin: float = MARGIN) -> Window:
    """The window of one group's trials (several trials at one LR: all must have converged for it to count as good)."""
    ran = [r for r in trials if r.outcome not in ("diverged", "pruned", "unfinished", "failed") and final_loss(r) is not None]
    best = min(ran, key=lambda r: (final_loss(r), r.learning_rate)) if ran else None
    by_lr: dict[float, list[TrialRecord]] = defaultdict(list)
    for r in trials:
        if r.outcome not in ("failed", "unfinished"):
            by_lr[r.learning_rate].append(r)
    lrs = sorted(by_lr)
    target = final_loss(best) * (1 + margin) if best else -math.inf

    def good(lr: float) -> bool:
        return all(r.outcome == "converged" and final_loss(r) <= target for r in by_lr[lr])

    well: list[tuple[float, float]] = []
    for i, lr in enumerate(lrs):
        if good(lr):
            if well and i and good(lrs[i - 1]):
                well[-1] = (well[-1][0], lr)
            else:
                well.append((lr, lr))
    unstable = next((lr for lr in lrs if any(r.outcome in UNSTABLE for r in by_lr[lr])), None)
    how = None
    if unstable is not None:
        how = "diverged" if any(r.outcome == "diverged" for r in by_lr[unstable]) else "oscillating"
    above = [lr for lr in lrs if unstable is not None and lr > unstable and all(r.outcome == "converged" for r in by_lr[lr])]
    return Window(best, well, unstable, how, max(above) if above else None, edges.edge(points(trials)), len(lrs))


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
    findings.extend(small_heldout(records))
    for method in methods(records):
        findings.extend(_method_findings(records, method))
    findings.extend(_too_low(records))
    findings.extend(_overfitting(records))
    findings.extend(_forgetting(records))
    findings.extend(edge_findings(records))
    findings.extend(memory_findings(records))
    return findings


_fmt = edges.lr_text


def groups(records: list[TrialRecord]) -> dict[tuple, list[TrialRecord]]:
    """The trials that differ only in learning rate: (method, the other searched values) -> trials, slowest first."""
    out: dict[tuple, list[TrialRecord]] = defaultdict(list)
    for r in records:
        if r.outcome in ("failed", "unfinished"):
            continue
        searched = r.params or {k: r.config[k] for k in ("batch_size",) if k in r.config}  # records from before params
        others = tuple(sorted((k, v) for k, v in searched.items() if k not in ("method", "learning_rate")))
        out[(r.method, others)].append(r)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0][0], repr(kv[0][1]))))


def points(trials: list[TrialRecord]) -> list[edges.Point]:
    """The group's trials as the edge finder sees them (the same view the refiner had while the sweep ran)."""
    done = ("diverged", "pruned", "unfinished", "failed")
    return [edges.Point(r.learning_rate, r.outcome == "diverged", final_loss(r) if r.outcome not in done else None)
            for r in trials]


def _group_name(key: tuple) -> str:
    method, others = key
    return ", ".join([method, *(f"{k.replace('_size', '')} {v}" for k, v in others)])


def small_heldout(records: list[TrialRecord]) -> list[str]:
    """A warning when the held-out set has fewer than ``MIN_EVAL`` records: every held-out verdict rests on them."""
    sizes = {int(r.final["eval_records"]) for r in records if isinstance(r.final.get("eval_records"), (int, float))}
    if not sizes or min(sizes) >= MIN_EVAL:
        return []
    n = min(sizes)
    return [f"warning: the held-out set has {n} record(s), fewer than {MIN_EVAL}: every held-out loss, overfit verdict "
            "and best trial below rests on them; give more held-out records (data.eval, or a larger data.eval_fraction)"]


def edge_findings(records: list[TrialRecord]) -> list[str]:
    """Per group with ``MIN_LRS`` LRs or more: where it learns well, where instability starts, where it diverges, and its
    best LR with the bracket its optimum lies in; the groups with fewer in one line. Then LoRA's best LR against full's
    and how the edge moved with batch size, each only where the trials can carry it."""
    out, located, few = [], {}, []
    for key, trials in groups(records).items():
        w = window(trials)
        pts = points(trials)
        o = edges.optimum(pts)
        located[key] = (w, o)
        if w.n_lrs < MIN_LRS:
            few.append(f"{_group_name(key)} ({w.n_lrs})")
            continue
        refined = sum(r.refine is not None for r in trials)
        tried = f"{w.n_lrs} LRs" + (f", {refined} from refinement" if refined else "")
        parts = [w.text()] + ([o.text()] if o is not None else [])
        out.append(f"{_group_name(key)}: " + "; ".join(parts) + f" [{tried}]")
    if few:
        out.append(f"too few learning rates to place a window or an edge (fewer than {MIN_LRS} in the group): "
                   + ", ".join(few))
    out.extend(_lora_vs_full(located))
    out.extend(_batch_scaling(located))
    return out


def _range(lo: float | None, hi: float | None) -> str:
    return f"{edges.ratio_text(lo)} .. {edges.ratio_text(hi)}" if lo and hi else "open-ended"


def _why_not(name: str, w: Window, o: edges.Optimum | None, need_edge: bool = False) -> str | None:
    """Why this group cannot carry a comparison; None when it can."""
    if w.n_lrs < MIN_LRS:
        return f"{name} has {w.n_lrs} LR(s), fewer than {MIN_LRS}"
    if w.best is None or w.best.outcome != "converged":
        what = f"its best trial (lr {_fmt(w.best.learning_rate)}) was {w.best.outcome}" if w.best else "none ran to its end"
        return f"no {name} trial converged at its best ({what})"
    if need_edge:
        if not (w.edge and w.edge.below and w.edge.above):
            return f"{name} has no divergence edge inside its range"
    elif o is None or None in o.bracket:
        return f"{name}'s best LR is at an end of its range (the optimum may lie beyond it)"
    return None


def _lora_vs_full(located: dict) -> list[str]:
    out = []
    for (method, others), (w, o) in located.items():
        full = located.get(("full", others))
        if method != "lora" or full is None:
            continue
        at = f" at {_group_name(('', others)).lstrip(', ')}" if others else ""
        why = _why_not("lora", w, o) or _why_not("full", *full)
        if why:
            out.append(f"LoRA's best LR against full fine-tuning's{at}: not stated, {why}")
            continue
        f = full[1]
        (llo, lhi), (flo, fhi) = o.bracket, f.bracket
        span = _range(llo / fhi, lhi / flo)
        out.append(f"LoRA's best LR is {edges.ratio_text(o.best / f.best)} full fine-tuning's{at} ({_fmt(o.best)} against "
                   f"{_fmt(f.best)}, both converged; the optima's brackets allow {span}; the rule of thumb says about 10x)")
    return out


def _batch_scaling(located: dict) -> list[str]:
    """Where the edge sits at each batch size, against linear (LR x k for batch x k) and square-root scaling."""
    out = []
    by_method: dict[str, list[tuple[int, Window, edges.Optimum | None]]] = defaultdict(list)
    for (method, others), (w, o) in located.items():
        bs = dict(others).get("batch_size")
        if bs is not None and len(others) == 1:
            by_method[method].append((bs, w, o))
    for method, rows in by_method.items():
        if len(rows) < 2:
            continue
        (b1, w1, o1), (b2, w2, o2) = min(rows, key=lambda x: x[0]), max(rows, key=lambda x: x[0])
        why = (_why_not(f"batch {b1}", w1, o1, need_edge=True) or _why_not(f"batch {b2}", w2, o2, need_edge=True))
        if why:
            out.append(f"{method}: how the divergence edge moves from batch {b1} to {b2} is not stated, {why}")
            continue
        e1, e2 = w1.edge, w2.edge
        moved = math.sqrt(e2.below * e2.above) / math.sqrt(e1.below * e1.above)
        lo, hi = e2.below / e1.above, e2.above / e1.below
        k = b2 / b1
        verdict = ", ".join(f"{name} {edges.ratio_text(x)} {'fits' if lo <= x <= hi else 'does not'}"
                            for name, x in (("linear", k), ("square-root", math.sqrt(k)), ("no change", 1.0)))
        out.append(f"{method}: from batch {b1} to {b2} the divergence edge moved {edges.ratio_text(moved)} ({_range(lo, hi)}); "
                   f"predicted: {verdict}")
    return out


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
    best = best_trial(records, method)
    if best:
        l0 = best.final.get("l0", float("nan"))
        parts.append(f"best lr {_fmt(best.learning_rate)} (eval loss {final_loss(best):.3f}, l0 {l0:.3f}, {best.outcome})")
    sens = lr_sensitivity(records, method)
    if sens is not None:
        parts.append(f"LR sensitivity {sens:.2f}")
    counts: dict[str, list[float]] = defaultdict(list)
    for r in alive:
        counts[r.outcome or "unclassified"].append(r.learning_rate)
    if best or sens is not None:  # how many ended how; where, per batch size (a group): the lines below, never pooled
        parts.append(f"{len(alive)} trial(s): " + ", ".join(
            f"{len(lrs)} {o}"
            for o, lrs in sorted(counts.items(), key=lambda kv: OUTCOME_ORDER.index(kv[0]) if kv[0] in OUTCOME_ORDER else 99)))
    if not parts:  # e.g. every trial pruned before its first eval: say so rather than print an empty finding
        parts.append("no trial reached an eval loss (" + ", ".join(f"{len(v)} {o}" for o, v in sorted(counts.items())) + ")")
    if failed:
        parts.append(f"{len(failed)} failed")
    return [f"{method}: " + "; ".join(parts)]


def _lrs(lrs: list[float], all_lrs: list[float]) -> str:
    """'lr <= 1e-5' when these are the lowest LRs of the method, 'lr >= 1e-2' when the highest, else a list."""
    lrs, all_lrs = sorted(set(lrs)), sorted(set(all_lrs))
    if len(lrs) > 1 and lrs == all_lrs:
        return f"lr {_fmt(lrs[0])} to {_fmt(lrs[-1])}"
    if len(lrs) > 1 and lrs == all_lrs[: len(lrs)]:
        return f"lr <= {_fmt(lrs[-1])}"
    if len(lrs) > 1 and lrs == all_lrs[-len(lrs):]:
        return f"lr >= {_fmt(lrs[0])}"
    return "lr " + ", ".join(_fmt(x) for x in lrs)


def _gain(r: TrialRecord) -> float | None:
    return curves.gain(r.final.get("l0"), final_loss(r))


_RULES = curves.Thresholds()


def _too_low(records) -> list[str]:
    """For every method: the learning rates at which every trial learned too little (slow, or pruned with as little gained)."""
    l0s = [r.final.get("l0") for r in records if r.final.get("l0") is not None]
    losses = [final_loss(r) for r in records if final_loss(r) is not None]
    if not l0s or not losses:
        return []
    if max(l0s) - min(losses) <= 0:
        return ["no trial lowered the eval loss below the base model's: nothing was learned in this budget"]
    out = []
    for method in methods(records):
        mine = [r for r in records if r.method == method and r.outcome not in ("failed", "unfinished")]
        by_lr: dict[float, list[TrialRecord]] = defaultdict(list)
        for r in mine:
            by_lr[r.learning_rate].append(r)
        best = best_trial(records, method)
        best_gain = _gain(best) if best else None

        def little(r: TrialRecord, best_gain=best_gain) -> bool:  # slow, or pruned behind while it had gained as little
            return r.outcome == "slow" or (r.outcome == "pruned" and curves.low_gain(_gain(r), best_gain, _RULES) is not None)

        slow = [lr for lr, rs in by_lr.items() if all(little(r) for r in rs) and any(_gain(r) is not None for r in rs)]
        if not slow:
            continue
        gains = [g for lr in slow for g in (_gain(r) for r in by_lr[lr]) if g is not None]
        most = f"at most {max(gains):.0%} of l0" if gains else "little"
        if best is None or best.outcome == "slow":  # even its best LR learned too little
            out.append(f"{method}: every LR tried ({_lrs(slow, slow)}) learned too little in this budget (gained {most}): "
                       "raise the learning-rate range or train longer")
            continue
        low = [lr for lr in slow if lr < best.learning_rate]
        high = [lr for lr in slow if lr not in low]
        against = f", against {_gain(best):.0%} at its best lr {_fmt(best.learning_rate)}" if _gain(best) is not None else ""
        if low:
            out.append(f"{method}: {_lrs(low, list(by_lr))} too low for this budget (gained {most}{against}): "
                       "raise the learning rate or train longer")
        if high:
            out.append(f"{method}: {_lrs(high, list(by_lr))} learned little (gained {most}{against}) although above the best LR")
    return out


def _overfitting(records) -> list[str]:
    """For every method: the LRs whose training loss fell while the held-out loss rose (outcome overfit)."""
    out = []
    for method in methods(records):
        mine = [r for r in records if r.method == method and r.outcome not in ("failed", "unfinished")]
        over = [r for r in mine if r.outcome == "overfit"]
        if not over:
            continue
        drops = [d for d in (curves.train_drop([h["train_loss"] for h in r.history if h.get("train_loss") is not None])
                             for r in over) if d is not None]
        above = any(r.final.get("eval_loss", 0) >= r.final.get("l0", float("inf")) for r in over)
        fell = f"the training loss fell (by up to {max(drops):.0%})" if drops else "the training loss fell"
        rose = "rose above the base model's" if above else "rose after its minimum"
        out.append(f"{method}: at {_lrs([r.learning_rate for r in over], [r.learning_rate for r in mine])} {fell} but the "
                   f"held-out loss {rose}: overfitting or a train/eval mismatch, not divergence. Try fewer epochs, a lower LR, "
                   "or eval data drawn like the training data")
        best = best_trial(records, method)
        if best is not None and best.outcome == "overfit":
            out.append(f"{method}: its best trial (lr {_fmt(best.learning_rate)}) overfit too: {best.evidence}; "
                       "fewer epochs would end nearer its lowest held-out loss")
    return out


def _forgetting(records) -> list[str]:
    parts = []
    for method in methods(records):
        best = best_trial(records, method)
        if best and best.final.get("forgetting") is not None:
            parts.append(f"{method} {best.final['forgetting']:+.2f}")
    if not parts:
        return []
    return ["forgetting (reference-text NLL change, nats, at each method's best LR): " + "; ".join(parts)]


def memory_findings(records) -> list[str]:
    """Per method: the measured peak memory against the estimate the GPU share was sized from (GPU trials), or the
    peak resident set of a CPU trial's process (which includes the Python runtime, so no estimate is compared)."""
    out = []
    for method in methods(records):
        rows = [r.final for r in _of(records, method) if r.final.get("peak_mem_gib")]
        if not rows:
            continue
        peaks = [f["peak_mem_gib"] for f in rows]
        sized = [f for f in rows if f.get("mem_estimate_gib") and f.get("gpu_share")]
        if sized and all(f.get("mem_cap_gib") for f in sized):  # on GPUs: the allocator's peak, what the cap limits
            ratios = sorted(f["peak_mem_gib"] / f["mem_estimate_gib"] for f in sized)
            est = max(f["mem_estimate_gib"] for f in sized)
            out.append(f"{method}: GPU memory peak {min(peaks):.2f}-{max(peaks):.2f} GiB against an estimate of up to "
                       f"{est:.2f} GiB (peak/estimate {ratios[0]:.2f}-{ratios[-1]:.2f}, median "
                       f"{ratios[len(ratios) // 2]:.2f}; shares were sized at 1.25x the estimate)")
        else:
            out.append(f"{method}: peak resident memory of a trial's process {min(peaks):.2f}-{max(peaks):.2f} GiB "
                       "(CPU: the whole process, Python and libraries included)")
    return out

