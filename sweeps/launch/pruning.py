"""The pruning bridge: Optuna decides, Ray stops the trial.

Ray's ``OptunaSearch`` forwards intermediate values to Optuna but never asks
``should_prune()``. ``PruningSearch`` is an ``OptunaSearch`` that is also a Ray
Tune ``Stopper`` (public API): passed as ``TuneConfig(search_alg=...)`` and
``RunConfig(stop=...)``, it

1. applies the divergence rules (always on) to every result;
2. reports the intermediate value at ``step = examples_seen`` (the same
   progress axis for every batch size) and asks the study's pruner;
3. returns True to stop the trial, and remembers why;
4. tells Optuna ``PRUNED`` (not COMPLETE with a partial value) for every
   stopped or diverged trial, and ``FAIL`` for failed ones; a trial the stall
   watchdog failed keeps the reason in its user attribute ``stalls``, also
   when a retry then completes it.

With several objectives (``search.metric: [eval_loss, forgetting]``) the study
is multi-objective, and Optuna cannot prune it: ``Trial.report`` raises and
its pruners read ``study.direction``, which such a study does not have. The
bridge then stores the intermediate value itself and shows the pruner a view
of the study in the primary metric's direction; the spec allows only median or
percentile there, and only when it names the rule (``sweeps.spec``). The
divergence rules do not depend on the objectives and always apply.

Reasons are appended to ``stops.jsonl`` in the sweep folder, so they survive
a driver crash and a resume. After ``Tuner.restore`` Ray unpickles the
searcher and the stopper as two objects; the stopper then delegates to the
live searcher (found by study name), so one object keeps deciding.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import Trial, TrialState
from ray.tune import Stopper
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from sweeps.faults import append_line, atomic_write
from sweeps.launch.refine import DONE, GRID, WAIT
from sweeps.launch.space import n_trials
from sweeps.launch.trial import objective_keys
from sweeps.results.classify import classify
from sweeps.results.records import RESTARTED, TrialRecord, read_stops  # read_stops' home; still importable from here
from sweeps.spec import Pruning, SweepSpec
from trainer.curves import DivergenceRule

log = logging.getLogger(__name__)
_LIVE: dict[str, PruningSearch] = {}


class DivergenceMonitor:
    """The divergence rule (``trainer.curves.DivergenceRule``, the spec's thresholds) for one trial, fed one report at a time.

    A non-finite value (or the trainer's own diverged status) stops the trial at once. The loss rules
    (spike, smoothed-loss factor) stop it no earlier than its ``min_reports``-th report, so that every
    curve has that many points; a divergence seen earlier stops it there, under its first reason.
    """

    def __init__(self, factor: float, spike: float, min_reports: int):
        self.rule = DivergenceRule(factor, spike)
        self.min_reports = min_reports
        self.reports = 0
        self.pending: str | None = None

    def update(self, result: dict[str, Any]) -> str | None:
        """The reason, if the trial must stop at this report; None otherwise."""
        self.reports += 1
        seen = result.get("examples_seen", "?")
        if result.get("status") == "diverged":
            return f"diverged: {result.get('reason') or 'reported by the trainer'}"
        norm = result.get("grad_norm")
        if norm is not None and not math.isfinite(norm):
            return f"diverged: non-finite grad norm at {seen} examples"
        reason = self.rule.check(result.get("train_loss"), result.get("train_loss_ema"))
        if reason and reason.startswith("non-finite"):
            return f"diverged: {reason} at {seen} examples"
        if reason and not self.pending:
            self.pending = f"diverged: {reason} at {seen} examples"
        return self.pending if self.reports >= self.min_reports else None


def make_pruner(p: Pruning, report_every: int, total_examples: int) -> optuna.pruners.BasePruner:
    """The spec's rule as an Optuna pruner over steps measured in examples seen."""
    warmup = p.warmup_reports * report_every
    if p.rule == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=warmup)
    if p.rule == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.startup_trials, n_warmup_steps=warmup)
    if p.rule == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(warmup, report_every), reduction_factor=3)
    if p.rule == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(warmup, report_every), max_resource=total_examples)
    return optuna.pruners.NopPruner()


class PruningSearch(OptunaSearch, Stopper):
    """OptunaSearch + Stopper: see the module docstring."""

    def __init__(self, spec: SweepSpec, *, space, sampler, storage, pruner, stops_file: Path, report_every: int,
                 refiner=None):
        keys = objective_keys(spec.search.metrics)
        multi = spec.search.multi_objective
        # Ray's OptunaSearch takes a metric list and a mode list for a multi-objective study
        super().__init__(
            space=space, metric=keys if multi else keys[0], mode=spec.search.modes if multi else spec.search.modes[0],
            sampler=sampler, storage=storage, study_name=spec.name,
        )
        self._ot_study.pruner = pruner
        self._objective_keys = keys
        self._primary_direction = StudyDirection.MINIMIZE if spec.search.modes[0] == "min" else StudyDirection.MAXIMIZE
        self._key = spec.name
        self._pruning = spec.pruning
        self._report_every = report_every
        self._stops_file = str(stops_file)
        self._monitors: dict[str, DivergenceMonitor] = {}
        self._stopped: dict[str, str] = {}
        self._thresholds = spec.thresholds()
        self._curves: dict[str, list[dict[str, Any]]] = {}  # each trial's reports, to classify it when it ends
        self._refiner = refiner  # sweeps.launch.refine.Refiner: proposes LRs after the grid (None: the grid only)
        self._n_first = n_trials(spec)  # the trials before any refinement: the grid's, or those sampled
        self.finished = False  # the refiner had nothing more to propose
        _LIVE[self._key] = self

    # --- the live object ------------------------------------------------------------
    def _live(self) -> PruningSearch:
        return _LIVE.get(self._key, self)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._stopped.update(read_stops(Path(self._stops_file)))
        _LIVE[self._key] = self
        # A trial the study holds as running but Ray's saved state does not know (it started after Ray last saved,
        # then the driver was killed): no Ray trial will finish it. It starts again, from its beginning, as the
        # next trial Ray asks for: same Optuna trial, same values, its MLflow run reused (``restart_of``).
        mine = {t._trial_id for t in self._ot_trials.values()}
        self._orphans = [t._trial_id for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                         if t._trial_id not in mine]

    def suggest(self, trial_id: str):
        _LIVE[self._key] = self
        if trial_id not in self._ot_trials and getattr(self, "_orphans", None):
            return self._restart(trial_id, self._orphans.pop(0))
        config = self._suggest(trial_id)
        if isinstance(config, dict) and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)  # which Ray trial holds it, for a resume
        return config

    def _restart(self, trial_id: str, storage_id: int):
        ot_trial = Trial(self._ot_study, storage_id)
        before = ot_trial.user_attrs.get("ray_trial_id")
        self._ot_trials[trial_id] = ot_trial
        ot_trial.set_user_attr("ray_trial_id", trial_id)
        config = super().suggest(trial_id)  # the space, run on the same Optuna trial, gives back its own values
        if before:
            config["restart_of"] = before
            for folder in Path(self._stops_file).parent.glob(f"run_trial_{before}_*"):
                atomic_write(folder / RESTARTED, json.dumps({"restarted_as": trial_id}))
        return config

    def _suggest(self, trial_id: str):
        if trial_id not in self._ot_trials:
            step = None
            if self._refiner is not None:
                step = self._refiner.step(self._ot_study)
                if step == WAIT:
                    return None  # a group still running may need more: Ray asks again
                if step == DONE:
                    self.finished = True
                    return Searcher.FINISHED
            if step is None and self._first_round_taken():
                # a resume: Ray asks again for the trials its saved state had not yet seen, which ran since
                return Searcher.FINISHED
            if step in (None, GRID) and getattr(self._space, "order", None):
                self._enqueue_next_cell(self._space.order)
        return super().suggest(trial_id)

    def _first_round_taken(self) -> bool:
        """Every trial the sweep asked for (without refinement) is in the study already."""
        trials = self._ot_study.get_trials(deepcopy=False)
        return sum(t.state != TrialState.WAITING for t in trials) >= getattr(self, "_n_first", math.inf)

    def _enqueue_next_cell(self, order: list[int]) -> None:
        """Hand the grid out in ``order`` (longest trials first) rather than GridSampler's random pick: the next
        cell no trial has taken is enqueued, and ``study.ask`` pops it."""
        trials = self._ot_study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return
        taken = {t.params.get("cell", t.system_attrs.get("fixed_params", {}).get("cell")) for t in trials}
        taken |= {t.system_attrs.get("grid_id") for t in trials}
        nxt = next((i for i in order if i not in taken), None)
        if nxt is not None:
            self._ot_study.enqueue_trial({"cell": nxt})

    # --- Stopper ----------------------------------------------------------------------
    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self._live()._decide(trial_id, result)

    def stop_all(self) -> bool:
        return False

    def _decide(self, trial_id: str, result: dict[str, Any]) -> bool:
        if result.get("storage_problem"):
            return False  # not a point of the curve: the trial could not store its checkpoint, the sweep stops
        if result.get("replayed"):
            return trial_id in self._stopped  # a trial that ended before a hard kill, said again (sweeps.launch.resume)
        if result.get("stalled"):
            # The watchdog's last word before the trial fails: not a point of the curve, and no reason to stop it
            # here (a stopped trial is not retried); the Optuna trial keeps the reason, whatever the retry gives.
            self._note_stall(trial_id, result["stalled"])
            return False
        self._curves.setdefault(trial_id, []).append({k: result[k] for k in _CURVE_KEYS if k in result})
        if trial_id in self._stopped:
            return True
        d = self._pruning.divergence
        monitor = self._monitors.setdefault(trial_id, DivergenceMonitor(d.factor, d.spike, d.min_reports))
        reason = monitor.update(result)
        if reason is None and not result.get("done"):
            reason = self._ask_pruner(trial_id, result)
        if reason is None:
            return False
        self._stopped[trial_id] = reason
        _append_stop(Path(self._stops_file), trial_id, reason)
        return True

    def _note_stall(self, trial_id: str, reason: str) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            ot_trial.set_user_attr("stalls", [*ot_trial.user_attrs.get("stalls", []), reason])

    def _ask_pruner(self, trial_id: str, result: dict[str, Any]) -> str | None:
        ot_trial = self._ot_trials.get(trial_id)
        value, step = result.get(self._pruning.metric), result.get("examples_seen")
        if ot_trial is None or value is None or step is None or not math.isfinite(value):
            return None
        storage, multi = self._ot_study._storage, len(self._objective_keys) > 1
        if (result.get("config") or {}).get("refine"):
            # A refinement trial is there to measure an edge: near it, a curve is behind the median by design, and
            # stopping it would leave "did it diverge?" unanswered. The divergence rules still stop it.
            return None
        if multi:  # Trial.report raises here; the storage keeps the curve all the same
            storage.set_trial_intermediate_value(ot_trial._trial_id, int(step), float(value))
        else:
            ot_trial.report(float(value), int(step))
        by_method = self._pruning.scope == "method" and self._pruning.rule in ("median", "percentile")
        study = self._ot_study
        if by_method or multi:
            # Compare like with like: LoRA learns slower per example than full fine-tuning at its best LR,
            # so a sweep-wide median would prune good LoRA trials for being LoRA.
            method = (result.get("config") or {}).get("method") if by_method else None
            study = _StudyView(self._ot_study, method, self._primary_direction)
        if study.pruner.prune(study, storage.get_trial(ot_trial._trial_id)):
            scope = f" among {self._pruning.scope} trials" if by_method else ""
            return f"pruned: {self._pruning.rule}{scope} at {step} examples"
        return None

    # --- Searcher ---------------------------------------------------------------------
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Intermediate values are reported in the stopper role (it runs first), not here."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        live = self._live()
        if live is not self:
            return live.on_trial_complete(trial_id, result, error)
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            self._completed_trials.add(trial_id)  # told before (a failed trial a resume ran again, or sweeps.launch.resume)
            return
        status = (result or {}).get("status")
        values = [(result or {}).get(k) for k in self._objective_keys]
        measured = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        if error or status == "failed":
            state, value = TrialState.FAIL, None
        elif trial_id in self._stopped or status == "diverged" or not measured:
            state, value = TrialState.PRUNED, None
        else:
            state, value = TrialState.COMPLETE, (values if len(values) > 1 else values[0])
        outcome = self._outcome(trial_id, result, error)
        try:
            ot_trial.set_user_attr("outcome", outcome)  # what the refiner reads: did this LR diverge?
            self._ot_study.tell(ot_trial, value, state=state)
        except Exception as exc:  # a trial already told (e.g. after a resume) must not stop the sweep
            log.warning("optuna: could not record trial %s as %s: %s", trial_id, state.name, exc)
        self._completed_trials.add(trial_id)

    def _outcome(self, trial_id: str, result: dict | None, error: bool) -> str:
        """The trial's class by the same rules as the map's (``sweeps.results.classify``), from the reports seen here."""
        result = result or {}
        record = TrialRecord(trial_id, config=dict(result.get("config") or {}), history=self._curves.pop(trial_id, []),
                             final=result, stopped_by=self._stopped.get(trial_id), error="failed" if error else None)
        return classify(record, best_gain=None, thresholds=self._thresholds)[0]

    def stop_reason(self, trial_id: str) -> str | None:
        return self._live()._stopped.get(trial_id)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_monitors"] = {}
        return state


_CURVE_KEYS = ("examples_seen", "train_loss", "train_loss_ema", "eval_loss", "l0")


class _StudyView:
    """The study as the pruner sees it: only the trials of one tuning method (when given), and the primary
    metric's direction (a multi-objective study has no single ``direction``)."""

    def __init__(self, study: optuna.Study, method: str | None, direction: StudyDirection):
        self._study, self._method, self.direction = study, method, direction

    def get_trials(self, deepcopy: bool = True, states=None):
        trials = self._study.get_trials(deepcopy=deepcopy, states=states)
        return trials if self._method is None else [t for t in trials if _method_of(t) == self._method]

    def __getattr__(self, name: str):
        return getattr(self._study, name)


def _method_of(trial) -> str | None:
    return trial.params.get("method", trial.user_attrs.get("method"))


def search_finished(name: str) -> bool:
    """Whether the live searcher of sweep ``name`` ended the search (its refiner had nothing left to propose)."""
    live = _LIVE.get(name)
    return bool(live and live.finished)


def _append_stop(path: Path, trial_id: str, reason: str) -> None:
    append_line(path, json.dumps({"trial_id": trial_id, "reason": reason}))
