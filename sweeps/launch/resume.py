"""A resume after a hard kill: what Ray's saved state does not know yet.

Ray Tune saves its experiment state every 10 s or more. A driver killed hard (SIGKILL, the OOM killer) leaves a
state older than the sweep: a trial that finished since is still running there, and Ray would train it again
from its checkpoint, which may even be gone by then (Ray keeps one). The sweep's own records are written as
things happen: each trial's ``result.json`` (``sweeps.launch.folder``), ``stops.jsonl`` and the Optuna study. So:

- ``ended_trials``: the trials those records call ended, with their last result. The resumed trial function
  reports that result again and returns (``sweeps.launch.trial``), so Ray, the searcher and its concurrency limit
  close the trial as they would have; nothing is trained or logged twice (the result is marked ``replayed``).
- ``keep_restorable``: a trial still to run whose checkpoint is gone gets an empty checkpoint folder: Ray's
  restore goes through and the trial starts again from its beginning (``sweeps.launch.trial.usable_checkpoint``),
  under its id and in its MLflow run, rather than failing.

A trial Ray's state does not know at all is started again by the searcher (``PruningSearch.restore``). A failed
trial is left as Ray has it: ``--resume`` runs errored trials again, by design.
"""
from __future__ import annotations

import json
from pathlib import Path

from sweeps.results.collect import trial_results
from sweeps.results.records import Status, read_stops

GONE = "GONE.txt"
# Ray's own keys of a result (ray.tune.result.AUTO_RESULT_KEYS and the trial id): Ray sets them again
_RAY_KEYS = {"training_iteration", "time_total_s", "episodes_total", "timesteps_total", "node_ip", "hostname", "pid",
             "time_this_iter_s", "timestamp", "date", "time_since_restore", "timesteps_since_restore",
             "iterations_since_restore", "config", "checkpoint_dir_name", "trial_id", "experiment_tag"}


def ended_trials(sweep_dir: Path) -> dict[str, dict]:
    """trial id -> its last result (marked ``replayed``), for every trial the sweep folder records as ended: its
    final report is there, or the sweep stopped it. A failed trial is not among them."""
    stops = read_stops(Path(sweep_dir) / "stops.jsonl")
    out = {}
    for trial_id, lines in trial_results(Path(sweep_dir)).items():
        results = [x for x in lines if "stalled" not in x and "storage_problem" not in x]
        if results and (trial_id in stops or (results[-1].get("done") and results[-1].get("status") != Status.FAILED)):
            out[trial_id] = {**{k: v for k, v in results[-1].items() if k not in _RAY_KEYS}, "replayed": True}
    return out


def keep_restorable(sweep_dir: Path, ended: dict[str, dict]) -> None:
    """For each trial Ray's newest saved state will restore from a checkpoint that is gone, an empty folder."""
    states = sorted(Path(sweep_dir).glob("experiment_state-*.json"))
    if not states:
        return
    try:
        trial_data = json.loads(states[-1].read_text())["trial_data"]  # the one Tuner.restore reads (newest by name)
    except (ValueError, KeyError, TypeError, OSError):
        return  # not a state this code knows: Ray's own restore decides
    for pair in trial_data:
        try:
            status = json.loads(pair[0]).get("status")
        except (ValueError, TypeError, AttributeError):
            continue
        if status != "TERMINATED":
            _keep_restorable(pair, ended)


def _keep_restorable(pair: list[str], ended: dict[str, dict]) -> None:
    """A trial Ray will restore from a checkpoint its state names but the disk no longer has: an empty folder in
    its place, which the trial reads as "start from the beginning"."""
    from ray.tune.experiment.trial import Trial  # Ray: only a resume that finds a missing checkpoint reads it

    try:
        trial = Trial.from_json_state(pair[0], stub=True)
        trial.restore_run_metadata(pair[1])
        checkpoint = trial.checkpoint
    except Exception:  # a state Ray itself will judge
        return
    if checkpoint is None or Path(checkpoint.path).exists():
        return
    folder = Path(checkpoint.path)
    folder.mkdir(parents=True)
    (folder / GONE).write_text("This checkpoint was gone when the sweep resumed; the trial started again from its "
                               "beginning.\n")
    if trial.trial_id not in ended:
        print(f"resume: trial {trial.trial_id}'s checkpoint {folder.name} is gone; it starts again from its beginning",
              flush=True)
