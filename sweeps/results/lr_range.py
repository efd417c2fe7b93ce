"""Bounds from a learning-rate range test curve (Smith 2015; fastai's lr_find, Lightning's finder).

``suggest(lrs, losses)`` reads one ramped run (one loss per step, the LR growing geometrically) and returns:

- ``min_loss``: the LR at the minimum of the smoothed curve, after the start-up stretch;
- ``low`` / ``high``: the proposed search bounds, a decade either side of ``min_loss`` (2 decades);
- ``steepest``: where the smoothed loss falls fastest per decade of LR, between the start-up stretch
  and the minimum (a landmark on the plot; the bounds do not use it);
- ``diverge``: where the smoothed loss passed 4x its minimum, the trainer's stop (None if it never did);
- ``skip``: the first LR read (before it, the start-up stretch); ``beta``: the EMA's.

The rule, and why. Checked on lr.yaml (SmolLM2-135M, 32 invented facts, 2 epochs of cosine, batch 4),
whose grid and refinement found the best LRs full 1e-3, lora 1e-2, last_layer 1e-2:

1. Smooth over half a decade of LR, whatever the steps per decade: ``beta = 1 - 1/(steps per decade / 2)``
   (0.83 at 12 steps a decade). fastai's fixed 0.98 averages 50 steps, four decades of such a ramp:
   its minimum lagged the curve by a decade or more (full: 7e-3). ``trainer.curves.smooth`` runs on the
   log of the loss (batches differ by 2x, a blow-up by 10-100x: averaging logs keeps one blown-up
   batch from dragging the window) and, alike, on log10 of the LR, so that each smoothed loss is
   drawn at the middle of the window that made it: the EMA's lag, corrected. A wider window pulls
   the minimum down (the blow-up's side is the steeper): a decade moved it 2-3x lower.
2. Skip the start-up stretch: the first two windows (a decade at 12 a decade). A bias-corrected EMA
   of a few points is one or two batches' losses: the old 'steepest descent' was the very first
   step, an artefact of that, and its bounds spanned seven decades.
3. Propose a decade either side of the smoothed minimum. There the sweep's best LR sits: at 12 steps
   a decade the minima were full 5.7e-4, lora 5.6e-3, last_layer 4.6e-3 (the best 1.8-2.2x above);
   at the old ramp's 8.6 a decade, 1.0e-3, 1.2e-2, 1.6e-2 (the best 0.65-1x): a short run wants
   the largest LR that does not blow up. The steepest descent (full: 8.5e-5), fastai's 'valley'
   (in the descent) and minimum/10 all sit a decade or more below full's best, with it at or past
   the top of any 2-decade bracket around them. Centred on the minimum, the best LR can move 3x
   either way (a refinement round) and stay inside. The ramp's own blow-up is no upper bound: it
   trains 5-7 epochs on the way there and passes 4x at 5.6e-3, 3.2e-2, 1.8e-2, where the sweep's
   2-epoch runs diverge only at 1e-2, 1e-1, 1e-1.
"""
from __future__ import annotations

import itertools
import math

from trainer.curves import DivergenceRule, smooth

STOP_FACTOR = 4.0  # the stop (fastai and Lightning's finders): the smoothed loss past 4x its minimum
SMOOTH_DECADES = 0.5  # the EMA averages about this much of the ramp
SKIP_WINDOWS = 2  # the start-up stretch, in EMA windows
HALF_WIDTH = 1.0  # decades either side of the minimum: the bounds span 2


def beta_for(per_decade: float) -> float:
    """The EMA beta that averages ``SMOOTH_DECADES`` of a ramp with ``per_decade`` steps a decade (at least 2 points)."""
    return 1 - 1 / max(per_decade * SMOOTH_DECADES, 2.0)


def smoothed(lrs: list[float], losses: list[float], beta: float) -> tuple[list[float], list[float]]:
    """The smoothed curve: each point's LR is the middle of its window (log10 LR, smoothed alike), its value the
    smoothed log loss (``math.exp`` of it is the window's geometric-mean loss)."""
    at = [10**x for x in smooth([math.log10(lr) for lr in lrs], beta)]
    return at, smooth([math.log(v) for v in losses], beta)


def _round(x: float) -> float:
    return float(f"{x:.2g}")


def suggest(lrs: list[float], losses: list[float], beta: float | None = None) -> dict:
    if len(lrs) != len(losses) or len(lrs) < 3:
        raise ValueError(f"need matching lrs and losses, at least 3 points (got {len(lrs)} and {len(losses)})")
    if any(b <= a for a, b in itertools.pairwise(lrs)) or lrs[0] <= 0:
        raise ValueError("lrs must be positive and increasing")
    n = next((i for i, v in enumerate(losses) if not (math.isfinite(v) and v > 0)), len(losses))
    if n < 3:
        raise ValueError(f"need at least 3 finite, positive losses before the first bad one (got {n})")
    lrs, losses = lrs[:n], losses[:n]
    beta = beta_for((n - 1) / math.log10(lrs[-1] / lrs[0])) if beta is None else beta
    at, log_s = smoothed(lrs, losses, beta)

    end = n  # read up to the stop: the trainer's rule on the smoothed loss
    rule = DivergenceRule(STOP_FACTOR, spike=None)
    for i, value in enumerate(smooth(losses, beta)):
        if rule.check(None, value):
            end = i
            break
    diverge = at[end] if end < n else None
    skip = min(math.ceil(SKIP_WINDOWS / (1 - beta)), max(end - 3, 0))
    i_min = min(range(skip, max(end, skip + 1)), key=log_s.__getitem__)
    steepest = None
    if i_min - skip >= 2:
        slopes = {i: (log_s[i + 1] - log_s[i]) / math.log10(at[i + 1] / at[i]) for i in range(skip, i_min)}
        steepest = at[min(slopes, key=slopes.__getitem__)]
    centre = _round(at[i_min])
    return {"min_loss": at[i_min], "low": centre / 10**HALF_WIDTH, "high": centre * 10**HALF_WIDTH, "steepest": steepest,
            "diverge": diverge, "skip": at[skip], "beta": beta}
