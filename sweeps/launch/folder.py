"""The sweep folder as the record that survives: written by the driver, at once, as the trials report.

Ray Tune writes a trial's files into a staging folder under its session (``/tmp/ray/...``) and copies them to
the sweep folder with its own state, every 10 s or more. A driver killed in between (SIGKILL, the OOM killer)
left a trial that had finished (told to Optuna, logged to MLflow) without its results in the sweep folder, or
without its folder at all. ``TrialFiles`` writes each trial's ``params.json`` when it is created (also when its
worker was killed before it started) and appends each result to its ``result.json`` before any other callback
sees it; ``sweeps.results.collect`` reads those. ``MachineFaults`` ends the sweep with one line when a file cannot
be written (a full disk, a read-only store): a trial's checkpoint (``sweeps.launch.trial`` reports it), this folder,
or Ray's own state (its log record, kept off the terminal by ``sweeps.faults.StorageLogFilter``).
"""
from __future__ import annotations

import json
from pathlib import Path

from ray.tune import Callback
from ray.tune.utils.util import SafeFallbackEncoder

from sweeps.faults import LOG_FILTER, StorageProblem, append_line, atomic_write, problem_in, survive_memory_monitor


class TrialFiles(Callback):
    """``params.json`` and ``result.json`` of every trial, straight into its folder in the sweep folder."""

    def on_trial_start(self, iteration, trials, trial, **info):
        self._params(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._params(trial)
        if result.get("replayed"):
            return  # the last result of a trial that had ended, said again on a resume: it is there already
        append_line(Path(trial.path) / "result.json", json.dumps(result, cls=SafeFallbackEncoder))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._params(trial)  # a worker killed while it started (Ray's memory monitor): the trial is still recorded

    def on_trial_error(self, iteration, trials, trial, **info):
        self._params(trial)

    @staticmethod
    def _params(trial) -> None:
        path = Path(trial.path) / "params.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(trial.config, indent=2, sort_keys=True, cls=SafeFallbackEncoder))


class MachineFaults(Callback):
    """Faults of the machine, from inside ``Tuner.fit``: the first write that failed for lack of space or
    permission is raised out of it (the driver turns it into one line and exit code 3; Ray's saved state then is
    the last one written whole, which ``--resume`` reads); a worker Ray's memory monitor kills fails its trial."""

    def setup(self, **info):
        LOG_FILTER.install()  # Ray's handlers exist by now
        survive_memory_monitor()  # and a worker Ray's memory monitor kills fails its trial, not the sweep

    def on_trial_result(self, iteration, trials, trial, result, **info):
        found = result.get("storage_problem")
        if isinstance(found, dict):  # the trial could not store its checkpoint (sweeps.launch.trial), in its own folder
            raise StorageProblem(found.get("why") or "no space left on device", found.get("path") or trial.path,
                                 "a trial checkpoint")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._check_error(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._check_error(trial)

    def on_step_end(self, iteration, trials, **info):
        if LOG_FILTER.seen is not None:
            raise LOG_FILTER.seen

    @staticmethod
    def _check_error(trial) -> None:
        try:
            text = Path(trial.error_file).read_text() if getattr(trial, "error_file", None) else ""
        except OSError:
            return
        why = problem_in(text)
        if why:
            raise StorageProblem(why, None, "a trial's files")
