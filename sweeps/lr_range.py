"""Suggestions from a learning-rate range test curve (Smith 2015; fastai's lr_find, Lightning's finder).

``suggest(lrs, losses)`` smooths the loss (EMA, beta 0.98, bias-corrected) and returns:

- ``steepest``: the LR where the smoothed loss falls fastest per unit of log-LR, before its minimum;
- ``min_loss``: the LR at the smoothed minimum;
- ``diverge``: the last LR before the smoothed loss passed 4x its minimum (None if it never did);
- ``low`` / ``high``: proposed search bounds, steepest/10 (or min_loss/100) up to diverge (or min_loss*10).
"""
from __future__ import annotations

import math

from trainer.curves import EMA_BETA, DivergenceRule, smooth

STOP_FACTOR = 4.0


def suggest(lrs: list[float], losses: list[float], beta: float = EMA_BETA) -> dict:
    if len(lrs) != len(losses) or len(lrs) < 3:
        raise ValueError(f"need matching lrs and losses, at least 3 points (got {len(lrs)} and {len(losses)})")
    s = smooth(losses, beta)
    i_min = min(range(len(s)), key=s.__getitem__)
    diverge = None
    rule = DivergenceRule(STOP_FACTOR, spike=None)
    for i, value in enumerate(s):
        if rule.check(None, value):
            diverge = lrs[max(i - 1, 0)]
            break
    steepest = None
    if i_min >= 2:
        slopes = [(s[i + 1] - s[i]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i]))
                  for i in range(i_min) if lrs[i + 1] > lrs[i]]
        if slopes:
            steepest = lrs[min(range(len(slopes)), key=slopes.__getitem__)]
    min_loss = lrs[i_min]
    low = steepest / 10 if steepest else min_loss / 100
    high = diverge if diverge else min_loss * 10
    return {"steepest": steepest, "min_loss": min_loss, "diverge": diverge, "low": low, "high": max(high, low * 10)}
