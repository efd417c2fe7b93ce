"""The curve rules, once: smoothing, divergence, spikes, rebound, overfitting, gain.

Pure Python (no torch), so that the trainer's own stop, the sweep's pruning bridge, the curve
classifier and the learning-rate range test all call the same code with the same thresholds:

- ``Smoother``: the EMA of the train loss (beta 0.98, bias-corrected, as fastai and Lightning).
- ``DivergenceRule``: the training loss blew up: the smoothed loss above ``factor`` x its running
  minimum (fastai and Lightning LR finders stop at 4), or one loss above ``spike`` x the largest
  before it (Megatron's spiky-loss factor, 10). Fed one point at a time.
- ``spikes`` / ``rebound``: oscillation (LLM Foundry's loss-spike callback: >= 2x the mean of the
  preceding window; OLMo-core: > mean + 6 sigma), or a smoothed loss that ended above its minimum.
- ``overfit``: the training loss fell while the held-out loss rose: overfitting, or training data
  that does not transfer to the eval data. Not divergence (that is a property of the training loss).
- ``gain``: the share of the base model's held-out loss l0 that training removed.

``Thresholds`` carries every number; a sweep builds it from its spec (``pruning.divergence``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean, pstdev

EMA_BETA = 0.98


@dataclass(frozen=True)
class Thresholds:
    """Every threshold of the curve rules. ``factor`` and ``spike`` come from a sweep spec's
    ``pruning.divergence``, so the rule that stopped a trial is the rule that classifies it."""

    factor: float = 4.0  # diverged: smoothed loss > factor x its running minimum
    spike: float = 10.0  # diverged: one loss > spike x the largest loss before it
    spike_ratio: float = 2.0  # a spike: loss >= 2x the mean of the preceding window
    spike_sigma: float = 6.0  # ... or > mean + 6 sigma of that window
    spike_window: int = 8  # points in that window
    min_spikes: int = 3  # spikes in the last quarter that make a curve oscillating
    rebound: float = 1.1  # oscillating: the smoothed loss ended > 1.1x its minimum
    train_fell: float = 0.10  # overfit needs the train loss to have fallen by at least 10% of its start
    eval_rise: float = 0.05  # overfit: the held-out loss ended > 5% above its minimum
    low_gain: float = 0.10  # slow: gained < 10% of l0 ...
    low_share: float = 1 / 3  # ... or < a third of the best gain of its method in the sweep


class Smoother:
    """Bias-corrected EMA: ``update(x)`` returns the smoothed value after x."""

    def __init__(self, beta: float = EMA_BETA):
        self.beta, self.biased, self.n = beta, 0.0, 0

    def update(self, value: float) -> float:
        self.biased = self.beta * self.biased + (1 - self.beta) * value
        self.n += 1
        return self.value

    @property
    def value(self) -> float:
        return self.biased / (1 - self.beta**self.n) if self.n else math.nan


def smooth(values: list[float], beta: float = EMA_BETA) -> list[float]:
    s = Smoother(beta)
    return [s.update(v) for v in values]


class DivergenceRule:
    """The training loss blew up. Fed one point at a time: ``check(loss, smoothed)`` returns the reason
    in words (without a position: callers add 'at N examples' or 'at step K') or None.
    ``spike=None`` or ``factor=None`` switches that part off."""

    def __init__(self, factor: float | None = 4.0, spike: float | None = 10.0):
        self.factor, self.spike = factor, spike
        self.smooth_min = math.inf
        self.loss_max = -math.inf

    def check(self, loss: float | None, smoothed: float | None) -> str | None:
        for name, value in (("loss", loss), ("smoothed loss", smoothed)):
            if value is not None and not math.isfinite(value):
                return f"non-finite {name}"
        reason = None
        if loss is not None:
            if self.spike and self.loss_max > 0 and loss > self.spike * self.loss_max:
                reason = f"loss {loss:.3g} jumped past {self.spike:g}x the largest before it ({self.loss_max:.3g})"
            self.loss_max = max(self.loss_max, loss)
        if smoothed is not None:
            self.smooth_min = min(self.smooth_min, smoothed)
            if reason is None and self.factor and self.smooth_min > 0 and smoothed > self.factor * self.smooth_min:
                reason = f"smoothed loss {smoothed / self.smooth_min:.1f}x its minimum"
        return reason


def first_divergence(losses: list[float | None], smoothed: list[float | None], t: Thresholds) -> tuple[int, str] | None:
    """The first point where the divergence rule fires, with its reason; None if it never does."""
    rule = DivergenceRule(t.factor, t.spike)
    for i, (loss, sm) in enumerate(zip(losses, smoothed)):
        if loss is None:
            return i, "non-finite loss"
        reason = rule.check(loss, sm)
        if reason:
            return i, reason
    return None


def spikes(losses: list[float], t: Thresholds) -> list[int]:
    """Indices of the loss spikes in the last quarter of the curve."""
    start = len(losses) - max(1, len(losses) // 4)
    out = []
    for i in range(max(start, 2), len(losses)):
        window = losses[max(0, i - t.spike_window) : i]
        m, s = mean(window), pstdev(window) if len(window) > 1 else 0.0
        if losses[i] >= t.spike_ratio * m or (s > 0 and losses[i] > m + t.spike_sigma * s):
            out.append(i)
    return out


def rebound(smoothed: list[float], t: Thresholds) -> tuple[int, float] | None:
    """(index of the minimum, end / minimum) when the smoothed loss ended above ``rebound`` x its minimum."""
    if not smoothed or min(smoothed) <= 0:
        return None
    low = min(range(len(smoothed)), key=smoothed.__getitem__)
    ratio = smoothed[-1] / smoothed[low]
    return (low, ratio) if ratio > t.rebound else None


def train_drop(losses: list[float]) -> float | None:
    """How much the training loss fell, as a share of its first value (the last third's mean against the first point)."""
    if len(losses) < 2 or losses[0] <= 0:
        return None
    tail = losses[-max(1, len(losses) // 3) :]
    return (losses[0] - mean(tail)) / losses[0]


def overfit(train_losses: list[float], evals: list[tuple[int, float]], l0: float | None, t: Thresholds) -> str | None:
    """The training loss fell but the held-out loss rose: above its own minimum, or to the base model's l0 or above.

    ``evals`` are (examples seen, held-out loss) in order, the last one the final eval. Says which it looks like:
    mismatch when the held-out loss never went below l0, overfitting when it fell first and then rose.
    """
    drop = train_drop(train_losses)
    if drop is None or drop < t.train_fell or not evals:
        return None
    final = evals[-1][1]
    i_low = min(range(len(evals)), key=lambda i: evals[i][1])
    seen_low, low = evals[i_low]
    fell = f"train loss fell {drop:.0%}"
    if l0 is not None and final >= l0:
        if low >= l0:
            return (f"{fell} but the held-out loss never went below the base model's ({l0:.3f}) and ended at {final:.3f}: "
                    "the training data does not transfer to the eval data (mismatch), or it overfit at once")
        return (f"{fell} but the held-out loss fell to {low:.3f} at {seen_low} examples, then rose to {final:.3f}, "
                f"at or above the base model's {l0:.3f}: overfitting")
    if i_low < len(evals) - 1 and low > 0 and final > (1 + t.eval_rise) * low:
        return (f"{fell} while the held-out loss rose {final / low - 1:.0%} above its minimum "
                f"({low:.3f} at {seen_low} examples, {final:.3f} at the end): overfitting")
    return None


def gain(l0: float | None, final: float | None) -> float | None:
    """(l0 - final) / l0: the share of the base model's held-out loss that training removed."""
    if l0 is None or final is None or l0 <= 0 or not math.isfinite(final):
        return None
    return (l0 - final) / l0


def low_gain(g: float | None, best: float | None, t: Thresholds) -> str | None:
    """Gained little: below ``low_gain`` of l0, or below ``low_share`` of the best gain it is compared with."""
    if g is None:
        return None
    if g < t.low_gain:
        return f"gained {g:.0%} of l0 (< {t.low_gain:.0%})"
    if best is not None and best > 0 and g < t.low_share * best:
        return f"gained {g:.0%} of l0, under {t.low_share:.0%} of its method's best ({best:.0%})"
    return None
