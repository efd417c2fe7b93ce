"""The search space: the spec's dimensions as an Optuna define-by-run function, or as a grid.

OptunaSearch accepts a callable ``space(trial)``; it samples conditional
parameters (``lora_r`` only when ``method`` is lora) and per-method ranges.
For ``algorithm: grid`` the cells are enumerated here (per-method grids and
conditions included) and Optuna's GridSampler walks the cell index; the cell's
values are set as user attributes so the study shows them.
"""
from __future__ import annotations

from typing import Any

from sweeps.spec import Dimension, SweepSpec
from trainer.methods import method_cost

# optuna is imported where the sampler and the define-by-run space are built: --dry-run describes without it


# method first, so per-method ranges and `when: {method: ...}` conditions can see it
def _order(spec: SweepSpec) -> list[str]:
    keys = list(spec.space)
    return sorted(keys, key=lambda k: (k != "method", bool(spec.space[k].when), keys.index(k)))


def _active(dim: Dimension, chosen: dict[str, Any]) -> bool:
    return not dim.when or all(chosen.get(k) in v for k, v in dim.when.items())


class DefineByRun:
    """Picklable define-by-run space for tpe/random: ``space(trial) -> None`` (values via suggest_*)."""

    def __init__(self, spec: SweepSpec):
        self.space = {k: spec.space[k] for k in _order(spec)}
        self.default_method = spec.methods[0]

    def __call__(self, trial) -> None:
        chosen: dict[str, Any] = {}
        for name, dim in self.space.items():
            if not _active(dim, chosen):
                continue
            if dim.values is not None:
                chosen[name] = trial.suggest_categorical(name, dim.values)
                continue
            rng = dim.range_for(chosen.get("method", self.default_method))
            if rng.integer:
                chosen[name] = trial.suggest_int(name, int(rng.low), int(rng.high), log=rng.log)
            else:
                chosen[name] = trial.suggest_float(name, rng.low, rng.high, log=rng.log)


def grid_cells(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every cell of the grid, in a stable order (conditions and per-method grids applied)."""
    cells: list[dict[str, Any]] = [{}]
    for name in _order(spec):
        dim = spec.space[name]
        grown = []
        for cell in cells:
            if not _active(dim, cell):
                grown.append(cell)
                continue
            values = dim.values if dim.values is not None else dim.range_for(cell.get("method", spec.methods[0])).grid_points()
            grown.extend({**cell, name: v} for v in values)
        cells = grown
    return cells


class GridSpace:
    """Define-by-run for GridSampler: one categorical ``cell`` index; returns the cell's values.

    A refinement trial (``sweeps.launch.refine``: enqueued with ``refine`` among its user attributes) gets its
    group's values and the enqueued learning rate instead."""

    def __init__(self, spec: SweepSpec):
        self.cells = grid_cells(spec)
        self.order = longest_first(self.cells)[: n_trials(spec)]  # the cells in the order they are handed out
        self.keys = [k for k in spec.space if k != "learning_rate"]
        lrs = [c["learning_rate"] for c in self.cells if "learning_rate" in c]
        self.lr_bounds = (min(lrs), max(lrs)) if lrs else None

    def __call__(self, trial) -> dict[str, Any]:
        attrs = trial.user_attrs
        if "refine" in attrs:
            values = {k: attrs[k] for k in self.keys if k in attrs}
            values["learning_rate"] = trial.suggest_float("learning_rate", *self.lr_bounds, log=True)  # the enqueued LR
            return {**values, "refine": attrs["refine"]}
        index = trial.suggest_categorical("cell", list(range(len(self.cells))))
        cell = self.cells[index]
        for key, value in cell.items():
            trial.set_user_attr(key, value)
        return dict(cell)


def longest_first(cells: list[dict[str, Any]]) -> list[int]:
    """Cell indexes, the longest trials first, so that the last slot is not left running one long trial alone
    (a makespan rule): the costlier method, more epochs, the lower LR (a high one is often stopped early, diverged),
    the smaller batch (more optimizer steps for the same examples). The batch sizes of a method take turns at each
    LR, so their groups finish their grids together and their refinement rounds run side by side, not one group's
    last round alone at the end."""
    def cost(i: int) -> tuple:
        c = cells[i]
        return (-method_cost(c.get("method")), -(c.get("epochs") or 0), c.get("learning_rate") or 0.0,
                c.get("batch_size") or 0, i)
    return sorted(range(len(cells)), key=cost)


def max_refinement(spec: SweepSpec, n_grid: int) -> int:
    """An upper bound on refinement trials (``sweeps.launch.refine``): each group, each round, an edge point and the
    optimum's two sides."""
    refine = spec.search.refine
    if refine is None:
        return 0
    keys = [k for k in spec.space if k != "learning_rate"]
    groups = {group_key(c, keys) for c in grid_cells(spec)[:n_grid]}
    bound = len(groups) * refine.rounds * 3
    return min(bound, refine.max_trials) if refine.max_trials else bound


def group_key(values: dict[str, Any], keys: list[str]) -> tuple:
    """The group a trial belongs to: its values of the space's dimensions other than the learning rate."""
    return tuple((k, values[k]) for k in keys if k in values)


def n_trials(spec: SweepSpec) -> int:
    if spec.search.algorithm == "grid":
        return spec.search.n_trials or len(grid_cells(spec))
    return spec.search.n_trials or 20


def describe(spec: SweepSpec) -> str:
    """What a dry run prints: the grid's trials, or the space to be sampled."""
    lines = [f"sweep {spec.name}: {spec.search.algorithm}, {n_trials(spec)} trial(s), model {spec.model}",
             "objective: " + ", ".join(f"{m} ({mode})" for m, mode in zip(spec.search.metrics, spec.search.modes))
             + (" (multi-objective: the study looks for their Pareto front)" if spec.search.multi_objective else "")]
    if spec.search.algorithm == "grid":
        cells = grid_cells(spec)
        keys = sorted({k for c in cells for k in c}, key=lambda k: (k != "method", k))
        lines.append("in the order they start (the longest first):")
        lines.append("  ".join(f"{k:>14}" for k in ["#", *keys]))
        for i in longest_first(cells)[: n_trials(spec)]:
            lines.append("  ".join(f"{_fmt(v):>14}" for v in [i, *(cells[i].get(k, "-") for k in keys)]))
        refine = spec.search.refine
        if refine:
            group = ", ".join(k for k in spec.space if k != "learning_rate") or "the sweep"
            lines.append(
                f"refinement: then up to {refine.rounds} round(s) per {group}: bisect where the training loss starts to "
                f"diverge and narrow the best learning rate, until each is located within {refine.within:g}x; "
                f"at most {max_refinement(spec, n_trials(spec))} more trial(s), fewer when the edges are found sooner")
    else:
        for name in _order(spec):
            dim = spec.space[name]
            if dim.values is not None:
                what = f"one of {dim.values}"
            else:
                parts = [f"{m}: {_range_text(r)}" for m, r in (dim.per_method or {}).items()]
                if dim.low is not None:
                    parts.append(("others: " if parts else "") + _range_text(dim.range_for(None)))
                what = "; ".join(parts)
            cond = f"  (when {dim.when})" if dim.when else ""
            lines.append(f"  {name}: {what}{cond}")
    return "\n".join(lines)


def _range_text(r) -> str:
    return f"{r.low:g} .. {r.high:g}{' log' if r.log else ''}{' int' if r.integer else ''}"


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)




def make_sampler(spec: SweepSpec):
    """The spec's Optuna sampler; TPE, NSGA-II, random and grid all handle one objective or several."""
    import optuna

    seed, algorithm = spec.search.seed, spec.search.algorithm
    if algorithm == "grid":
        return grid_sampler(spec, seed)
    if algorithm == "nsga2":
        # the first generation is random; startup_trials sizes it (Optuna's default of 50 is more than a sweep runs)
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, spec.search.startup_trials))
    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.search.startup_trials)


def grid_sampler(spec: SweepSpec, seed: int):
    """Optuna's GridSampler over the cell index, minus its ``study.stop()`` at the end of the grid.

    GridSampler stops the study from ``after_trial`` once every cell was handed
    out; outside ``study.optimize`` (ask/tell, as Ray drives it) that raises
    inside ``tell`` before the trial's state is stored, so the last trials were
    never recorded. Ray's ``num_samples`` bounds the sweep instead.
    """
    return _NoStopGridSampler({"cell": list(range(len(grid_cells(spec))))}, seed=seed)


def _grid_base():
    import optuna

    return optuna.samplers.GridSampler


class _NoStopGridSampler(_grid_base()):
    def after_trial(self, study, trial, state, values) -> None:
        return None
