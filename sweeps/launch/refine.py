"""Refinement inside the sweep: after the grid, the next learning rates of each group, from the Optuna study.

The study (SQLite, in the sweep folder) is the only state: grid trials carry their cell's values as user
attributes, refinement trials are enqueued with theirs plus ``refine`` (the round) and ``why`` (edge,
optimum), and every finished trial gets ``outcome`` (``sweeps.results.classify``) before it is told. So a resumed
sweep proposes from what really ran, an enqueued trial is handed out once (``study.ask`` pops it), and an
LR already in a group (finished, running or waiting) is never proposed again.

``Refiner.step(study)`` says what the searcher does next:

- ``GRID``: grid cells are left and no group is ready to refine; let the grid sampler hand out the next one;
- ``ASK``: refinement trials are enqueued (now or before a resume); ``study.ask`` pops the first;
- ``WAIT``: a group whose trials still run may yet need more (Ray asks again later);
- ``DONE``: every group has its rounds, or is as precise as asked, or the cap is reached.
"""
from __future__ import annotations

import math
from collections import Counter

from optuna.trial import TrialState

from sweeps.launch.space import GridSpace, group_key
from sweeps.results import edges
from sweeps.spec import SweepSpec
from trainer.methods import method_cost

GRID, ASK, WAIT, DONE = "grid", "ask", "wait", "done"
PARAM = "learning_rate"


class Refiner:
    def __init__(self, spec: SweepSpec, n_grid: int):
        refine = spec.search.refine
        assert refine is not None
        self.rounds, self.within, self.cap = refine.rounds, refine.within, refine.max_trials
        self.n_grid = n_grid
        self.maximize = spec.search.modes[0] == "max"
        self.keys = [k for k in spec.space if k != PARAM]
        # grid trials per group: a group refines as soon as its own grid trials are done, while other groups' grid
        # trials are still to run (so no chain of rounds is left alone at the sweep's end); not with a cap on
        # refinement trials, whose share between groups would then depend on which finished first
        grid = GridSpace(spec)  # the cells it hands out, in its order
        self.grid_sizes = Counter(group_key(grid.cells[i], self.keys) for i in grid.order)

    def step(self, study) -> str:
        trials = study.get_trials(deepcopy=False)
        grid_left = sum("refine" not in t.user_attrs for t in trials) < self.n_grid
        if grid_left and self.cap is not None:
            return GRID
        if any(t.state == TrialState.WAITING for t in trials):
            return ASK
        refined = [t for t in trials if "refine" in t.user_attrs]
        room = None if self.cap is None else self.cap - len(refined)
        pending = False
        queued = 0
        groups = _groups(trials, self.keys)
        # the group with more rounds still to run first (its chain is the longest), then the costliest method
        for key, members in sorted(groups.items(), key=lambda kv: (_rounds(kv[1]), _longest_first(kv[0]))):
            if any(t.state == TrialState.RUNNING for t in members):
                pending = True
                continue
            if grid_left and sum("refine" not in t.user_attrs for t in members) < self.grid_sizes.get(key, 0):
                continue  # its grid trials are not all handed out yet
            done_rounds = _rounds(members)
            if done_rounds >= self.rounds or (room is not None and room - queued <= 0):
                continue
            for lr, why in edges.proposals(self.points(members), self.within):
                if room is not None and room - queued <= 0:
                    break
                study.enqueue_trial({PARAM: lr}, user_attrs={**dict(key), PARAM: lr, "refine": done_rounds + 1, "why": why})
                queued += 1
        if queued:
            return ASK
        if grid_left:
            return GRID
        return WAIT if pending else DONE

    def points(self, members) -> list[edges.Point]:
        out = []
        for t in members:
            if t.state not in (TrialState.COMPLETE, TrialState.PRUNED) or PARAM not in t.user_attrs:
                continue
            diverged = t.user_attrs.get("outcome") == "diverged"
            loss = None
            if t.state == TrialState.COMPLETE and not diverged and t.values and math.isfinite(t.values[0]):
                loss = -t.values[0] if self.maximize else t.values[0]
            out.append(edges.Point(float(t.user_attrs[PARAM]), diverged, loss))
        return out


def _groups(trials, keys: list[str]) -> dict[tuple, list]:
    out: dict[tuple, list] = {}
    for t in trials:
        if t.state == TrialState.FAIL or PARAM not in t.user_attrs:
            continue
        out.setdefault(group_key(t.user_attrs, keys), []).append(t)
    return out


def _rounds(members) -> int:
    """How many refinement rounds a group has had."""
    return max((t.user_attrs.get("refine", 0) for t in members), default=0)


def _longest_first(key: tuple) -> tuple:
    values = dict(key)
    # the costliest method first (Method.cost): the last slot is not left with one long trial
    return (-method_cost(values.get("method")), values.get("batch_size") or 0, repr(key))
