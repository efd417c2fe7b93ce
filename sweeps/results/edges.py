"""Edges, not a grid: where a method starts to diverge, where its optimum is, and the next LRs to try.

One group is the trials that share everything but the learning rate (a method at one batch size). Each
trial is a ``Point``: its LR, whether its training loss diverged (``sweeps.results.classify``), and its final
held-out loss when it ran to its end. From the points:

- the **divergence edge** lies between the highest LR that did not diverge below the lowest LR that did
  (``Edge.below`` .. ``Edge.above``);
- the **optimum** is bracketed by the best LR's nearest tried neighbours on each side (whatever they
  gave: worse, pruned or diverged), assuming one valley in log LR;
- the optimum is then placed within half of each gap: a parabola in log LR through the best point
  and its two neighbours (the best lower than both) has its vertex no further than half a gap from
  the best; so ``Optimum.within`` is the factor sqrt(gap) of the wider side;
- ``proposals`` are geometric midpoints: of the edge's interval while it is wider than ``within``, and
  of each side of the optimum while that side's half-gap is. From a decade grid, one round places
  every optimum within 10 ** (1/4) = 1.78x and two rounds every edge within 1.78x: within 2.
- a group with no edge in its range (nothing diverged, or everything did) or its best LR at an end of
  the range steps past that end by half the last gap (3.2x from a decade grid): the range is where the
  user guessed, not where the answer must be.

Pure Python: the searcher (``sweeps.launch.pruning``) proposes with it from the Optuna study while the sweep
runs, and the findings (``sweeps.results.analysis``) read the same edges from the finished records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SAME = 1.02  # two LRs closer than this ratio are the same point (a proposal is never tried twice)


@dataclass(frozen=True)
class Point:
    lr: float
    diverged: bool
    loss: float | None = None  # final held-out loss of a trial that ran to its end; None otherwise


@dataclass(frozen=True)
class Edge:
    below: float | None  # the highest LR under ``above`` that did not diverge (None: even the lowest diverged)
    above: float | None  # the lowest LR that diverged (None: none diverged)

    @property
    def ratio(self) -> float | None:
        return self.above / self.below if self.below and self.above else None

    def text(self) -> str:
        if self.above is None:
            return f"no divergence up to {lr_text(self.below)}" if self.below else "no divergence"
        if self.below is None:
            return f"diverges at every LR tried (from {lr_text(self.above)})"
        return f"diverges between {lr_text(self.below)} and {lr_text(self.above)} ({ratio_text(self.ratio)})"


@dataclass(frozen=True)
class Optimum:
    best: float
    loss: float
    lower: float | None  # the nearest LR tried below the best (None: the best is the lowest tried)
    upper: float | None  # the nearest LR tried above it (None: the best is the highest tried)

    @property
    def bracket(self) -> tuple[float | None, float | None]:
        """Where the optimum lies: between the best's neighbours, halfway (in log LR) towards each."""
        return (geo_mid(self.lower, self.best) if self.lower else None,
                geo_mid(self.best, self.upper) if self.upper else None)

    @property
    def within(self) -> float | None:
        """The factor within which the best LR tried locates the optimum (None: open on one side)."""
        lo, hi = self.bracket
        return max(self.best / lo, hi / self.best) if lo and hi else None

    def text(self) -> str:
        lo, hi = self.bracket
        if lo and hi:
            return f"best lr {lr_text(self.best)} (optimum in {lr_text(lo)} .. {lr_text(hi)}, within {ratio_text(self.within)})"
        side = "lowest" if not lo else "highest"
        return f"best lr {lr_text(self.best)} (the {side} LR tried: the optimum may lie beyond it)"


def lr_text(lr: float | None) -> str:
    """3.2e-3, 1e-2: the LR as the findings print it."""
    if lr is None:
        return "-"
    mantissa, exponent = f"{lr:.1e}".split("e")
    return mantissa.removesuffix(".0") + (f"e{int(exponent)}" if int(exponent) else "")


def ratio_text(x: float) -> str:
    """1.8x, 10x, 320x."""
    return f"{x:.2g}x" if x < 10 else f"{x:.0f}x"


def geo_mid(a: float, b: float) -> float:
    """The geometric midpoint, to 3 significant digits (the LR a trial gets and the map shows)."""
    return float(f"{math.sqrt(a * b):.3g}")


def edge(points: list[Point]) -> Edge | None:
    if not points:
        return None
    diverged = [p.lr for p in points if p.diverged]
    stable = [p.lr for p in points if not p.diverged]
    if not diverged:
        return Edge(below=max(stable), above=None)
    above = min(diverged)
    return Edge(below=max((lr for lr in stable if lr < above), default=None), above=above)


def optimum(points: list[Point]) -> Optimum | None:
    measured = [p for p in points if p.loss is not None and not p.diverged and math.isfinite(p.loss)]
    if not measured:
        return None
    best = min(measured, key=lambda p: (p.loss, p.lr))
    lrs = sorted({p.lr for p in points})
    return Optimum(best=best.lr, loss=best.loss, lower=max((lr for lr in lrs if lr < best.lr), default=None),
                   upper=min((lr for lr in lrs if lr > best.lr), default=None))


def proposals(points: list[Point], within: float = 2.0) -> list[tuple[float, str]]:
    """The next LRs for this group, each with why: midpoints of the intervals still wider than ``within``."""
    wanted: list[tuple[float, str]] = []
    lrs = sorted({p.lr for p in points})
    e = edge(points)
    if e and e.ratio and e.ratio > within:
        wanted.append((geo_mid(e.below, e.above), "edge"))
    elif e and (e.above is None or e.below is None):  # nothing diverged, or everything did: step past the range
        wanted += [(lr, "edge") for lr in [_beyond(lrs, up=e.above is None)] if lr]
    o = optimum(points)
    if o:
        for neighbour in (o.lower, o.upper):
            if neighbour and max(neighbour, o.best) / min(neighbour, o.best) > within ** 2:  # half-gap > within
                wanted.append((geo_mid(neighbour, o.best), "optimum"))
        if o.lower is None or o.upper is None:  # the best is at an end of the range: the optimum may lie past it
            wanted += [(lr, "optimum") for lr in [_beyond(lrs, up=o.upper is None)] if lr]
    out: list[tuple[float, str]] = []
    tried = [p.lr for p in points]
    for lr, why in wanted:
        if any(_same(lr, t) for t in tried):
            continue
        twin = next((i for i, (other, _) in enumerate(out) if _same(lr, other)), None)
        if twin is None:
            out.append((lr, why))
        elif why not in out[twin][1]:
            out[twin] = (out[twin][0], f"{out[twin][1]}+{why}")
    return sorted(out)


def _beyond(lrs: list[float], up: bool) -> float | None:
    """The next LR past the end of the range tried, half its last gap (in log LR) beyond it: from a decade grid,
    3.2x past; if that is past the edge too, the next round bisects to 1.8x. None with fewer than two LRs."""
    if len(lrs) < 2:
        return None
    end, inner = (lrs[-1], lrs[-2]) if up else (lrs[0], lrs[1])
    return geo_mid(end, end * end / inner)  # the midpoint of the end and its mirror image of ``inner``


def _same(a: float, b: float) -> bool:
    return max(a, b) / min(a, b) < SAME
