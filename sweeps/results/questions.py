"""Findings for two questions people bring (README: "Questions, and where the answer is").

- "I trained on one question and its answer and could not get the answer back until I trained more epochs. Why?"
  From the memorization curve (``exact_match_every``): per method and LR, the first point at which greedy decoding
  returned every training completion exactly, whether it stayed so, and the forgetting measured at that point and
  at the end (``one_example.yaml``).
- "Does splitting prompt and completion matter?" When a sweep varies ``prompt_loss_weight``: per method and LR, the
  held-out loss, the exact match of the training completions and the forgetting at each weight, and which tokens carry
  the loss at each weight (``prompt_loss.yaml``).

Both read only what the trials measured; a trial that diverged or was stopped says so instead.
"""
from __future__ import annotations

from collections import defaultdict

from sweeps.results.analysis import METHOD_ORDER, final_loss
from sweeps.results.edges import lr_text
from sweeps.results.records import TrialRecord

FINISHED = ("converged", "slow", "oscillating", "overfit")  # ran to the end: its final measures exist


def findings(records: list[TrialRecord]) -> list[str]:
    return memorization(records) + prompt_weight(records)


def _order(r: TrialRecord) -> tuple:
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return order.get(r.method, len(order)), r.method, repr(_others(r, ("method", "learning_rate"))), r.learning_rate


def _others(r: TrialRecord, leave_out: tuple[str, ...]) -> tuple:
    searched = r.params or {}
    return tuple(sorted((k, v) for k, v in searched.items() if k not in leave_out))


def _name(r: TrialRecord, leave_out: tuple[str, ...] = ("method", "learning_rate")) -> str:
    extra = "".join(f", {k.replace('_size', '')} {v}" for k, v in _others(r, leave_out))
    return f"{r.method}{extra}, lr {lr_text(r.learning_rate)}"


def _curve(r: TrialRecord) -> list[dict]:
    return [h for h in r.history if h.get("train_exact_match") is not None]


def memorization(records: list[TrialRecord]) -> list[str]:
    """Per trial with a memorization curve: after how many epochs its training completions came back exactly."""
    with_curve = sorted((r for r in records if len(_curve(r)) >= 2 and r.outcome not in ("failed",)), key=_order)
    if not with_curve:
        return []
    out, fewest = [], {}
    for r in with_curve:
        pts = _curve(r)
        n = r.final.get("train_records")
        what = ("its training completion" if n == 1
                else f"all {int(n)} training completions" if n else "every training completion")
        end = pts[-1]
        forgot_end = r.final.get("forgetting", end.get("forgetting"))
        end_text = f"{forgot_end:+.2f} nats" if forgot_end is not None else "not measured"
        first = next((i for i, p in enumerate(pts) if p["train_exact_match"] >= 1.0), None)
        if r.final.get("base_train_exact_match") == 1.0:
            out.append(f"{_name(r)}: the base model already returned {what} exactly: nothing to learn")
            continue
        if first is None:
            stopped = f", then {r.outcome} ({r.evidence})" if r.outcome in ("diverged", "pruned", "unfinished") else ""
            out.append(f"{_name(r)}: {what} never came back exactly in {_epochs(end)} (at most "
                       f"{max(p['train_exact_match'] for p in pts):.0%}){stopped}; forgetting at the end {end_text}")
            continue
        hit, after = pts[first], pts[first:]
        kept = ("and stayed so to the end" if all(p["train_exact_match"] >= 1.0 for p in after)
                else f"but not at every later point ({end['train_exact_match']:.0%} at the end)")
        then = f"; forgetting then {hit['forgetting']:+.2f} nats" if hit.get("forgetting") is not None else ""
        out.append(f"{_name(r)}: {what} came back exactly (greedy) after {_epochs(hit)} ({hit['examples_seen']} examples), "
                   f"{kept}{then}, at the end {end_text}")
        best = fewest.get(r.method)
        if best is None or hit["examples_seen"] < best[1]["examples_seen"]:
            fewest[r.method] = (r, hit)
    head = "fewest epochs until the training completion came back exactly, per method: " + (
        "; ".join(f"{m} {_epochs(hit)} at lr {lr_text(r.learning_rate)}"
                  + (f" (forgetting then {hit['forgetting']:+.2f} nats)" if hit.get("forgetting") is not None else "")
                  for m, (r, hit) in fewest.items()) or "none did")
    missing = list(dict.fromkeys(r.method for r in with_curve if r.method not in fewest))
    if fewest and missing:
        head += "; never: " + ", ".join(missing)
    schedules = {r.config.get("scheduler") for r in with_curve}
    if schedules - {"constant"}:
        head += (f" (the LR followed a {'/'.join(sorted(map(str, schedules)))} schedule over the whole run, so a run "
                 "stopped at that epoch would not have the same weights)")
    return [head, *out]


def _epochs(point: dict) -> str:
    e = point.get("epoch")
    return f"{e:g} epoch(s)" if e is not None else f"{point['examples_seen']} examples"


def prompt_weight(records: list[TrialRecord]) -> list[str]:
    """When the sweep varied prompt_loss_weight: what each weight did at each method and LR, and why."""
    weight = "prompt_loss_weight"
    varied = {r.config.get(weight) for r in records if r.config.get(weight) is not None}
    if len(varied) < 2:
        return []
    cells: dict[tuple, dict[float, TrialRecord]] = defaultdict(dict)
    for r in sorted(records, key=_order):
        if r.outcome != "failed":
            cells[(r.method, _others(r, ("method", weight)), r.learning_rate)][float(r.config.get(weight, 0.0))] = r
    out = [_mechanism(records, sorted(varied))]
    deltas: dict[str, list[str]] = defaultdict(list)
    for (method, _, lr), by_w in cells.items():
        name = _name(next(iter(by_w.values())), ("method", "learning_rate", weight))
        out.append(f"{name}: " + "; ".join(f"weight {w:g}: {_measures(by_w[w])}" for w in sorted(by_w)))
        lo, hi = min(by_w), max(by_w)
        a, b = by_w[lo], by_w[hi]
        if lo == hi:
            continue
        if a.outcome == b.outcome == "converged":  # a change is stated between trials that learned, as for methods
            deltas[method].append(f"lr {lr_text(lr)}: held-out loss {final_loss(b) - final_loss(a):+.2f}"
                                  + _delta(a, b, "train_exact_match", "exact match {:+.0f} points", 100)
                                  + _delta(a, b, "forgetting", "forgetting {:+.2f} nats"))
        else:
            deltas[method].append(f"lr {lr_text(lr)}: not stated (weight {lo:g} {a.outcome}, weight {hi:g} {b.outcome}: "
                                  "a change is stated only between trials that both converged)")
    for method, parts in deltas.items():
        out.append(f"{method}: from prompt_loss_weight {min(varied):g} to {max(varied):g}: " + "; ".join(parts))
    return out


def _measures(r: TrialRecord) -> str:
    if r.outcome not in FINISHED:
        return f"{r.outcome} ({(r.evidence or '')[:60]})"
    parts = [f"held-out loss {final_loss(r):.2f}"]
    if r.final.get("train_exact_match") is not None:
        parts.append(f"exact match {r.final['train_exact_match']:.0%}")
    if r.final.get("forgetting") is not None:
        parts.append(f"forgetting {r.final['forgetting']:+.2f}")
    return ", ".join(parts) + ("" if r.outcome == "converged" else f" ({r.outcome})")


def _delta(a: TrialRecord, b: TrialRecord, key: str, words: str, scale: float = 1.0) -> str:
    x, y = a.final.get(key), b.final.get(key)
    return f", {words.format((y - x) * scale)}" if x is not None and y is not None else ""


def _mechanism(records: list[TrialRecord], weights: list[float]) -> str:
    """Which tokens carry the loss at each weight: completion tokens weigh 1, the others the weight."""
    rows = [r.final for r in records if r.final.get("prompt_tokens") and r.final.get("completion_tokens")]
    head = ("which tokens carry the loss: each completion token weighs 1 and each prompt token prompt_loss_weight "
            "(0: the completion alone; 1: the whole sequence alike)")
    if not rows:
        return head
    p, c = rows[0]["prompt_tokens"], rows[0]["completion_tokens"]
    shares = ", ".join(f"{w:g}: {w * p / (w * p + c):.0%}" for w in weights)
    return f"{head}; with {p:.0f} prompt and {c:.0f} completion tokens an example, the prompt's share of it is {shares}"
