"""MLflow, written from the driver only: one parent run per sweep, one child run per trial.

Trials never write to MLflow: one writer means no SQLite lock contention and no
lost runs when a trial process dies. Every MLflow call is retried; what still
fails (a stopped tracking server) is queued in memory and in
``mlflow_pending.jsonl`` and replayed when the server answers again, at the
end of the sweep, or on ``--resume``. The trial -> run map lives in
``mlflow.json`` in the sweep folder and is checked against MLflow's own tags,
so a resumed sweep reattaches to its runs and never duplicates them.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

# LOGGED_METRICS, error_lines, trial_outcome live in sweeps.records and stay importable from here
from sweeps.records import LOGGED_METRICS, NOT_SETTINGS, Status, error_lines, read_stops, trial_outcome

log = logging.getLogger(__name__)

_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|CREDENTIAL|AUTH", re.I)
_RUN_STATUS = {Status.COMPLETED: "FINISHED", Status.PRUNED: "KILLED", Status.DIVERGED: "KILLED", Status.FAILED: "FAILED"}


def configure_client_timeouts() -> None:
    """A dead server must cost seconds, not MLflow's default minutes of retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def scrub(value: Any) -> Any:
    """Replace any environment secret (a *TOKEN*, *SECRET*, *KEY* variable's value) inside ``value``."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        for name, secret in os.environ.items():
            if _SECRET_NAME.search(name) and len(secret) >= 8 and secret in value:
                value = value.replace(secret, "***")
    return value


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(scrub(value))[:500]
    return out


# The trial -> run map and the replay queue of each sweep folder, shared by every Tracker of this process: on
# --resume Ray restores the MlflowWriter (and its Tracker) from the run's pickle, beside the driver's own Tracker;
# two maps would each miss the runs the other created, and two queues overwrite each other's file.
_SHARED: dict[str, dict[str, Any]] = {}


class Tracker:
    """The MLflow client with retries, a persistent trial -> run map and a replay queue."""

    def __init__(self, uri: str, experiment: str, sweep_dir: Path, artifact_root: str | None = None):
        self.uri, self.experiment, self.sweep_dir = uri, experiment, Path(sweep_dir)
        self.artifact_root = artifact_root
        self._client = None
        self._state = None
        self._pending: list[dict] | None = None
        self._down_since: float | None = None

    # --- state ---------------------------------------------------------------------
    @property
    def state(self) -> dict:
        if self._state is None:
            shared = _SHARED.setdefault(str(self.sweep_dir.resolve()), {})
            if "state" not in shared:
                path = self.sweep_dir / "mlflow.json"
                shared["state"] = json.loads(path.read_text()) if path.is_file() else {"runs": {}, "steps": {}}
            self._state = shared["state"]
        return self._state

    def _save_state(self) -> None:
        tmp = self.sweep_dir / "mlflow.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.sweep_dir / "mlflow.json")

    @property
    def pending(self) -> list[dict]:
        if self._pending is None:
            shared = _SHARED.setdefault(str(self.sweep_dir.resolve()), {})
            if "pending" not in shared:
                path = self.sweep_dir / "mlflow_pending.jsonl"
                shared["pending"] = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
            self._pending = shared["pending"]
        return self._pending

    def _save_pending(self) -> None:
        path = self.sweep_dir / "mlflow_pending.jsonl"
        if self.pending:
            path.write_text("".join(json.dumps(op) + "\n" for op in self.pending))
        elif path.exists():
            path.unlink()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_state": None, "_pending": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # --- operations ------------------------------------------------------------------
    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        # MLflow 3's UI opens an experiment of unknown kind on its GenAI traces overview; this tag makes it
        # open on the runs table, where a sweep's curves are
        return self.client.create_experiment(self.experiment, artifact_location=self.artifact_root,
                                             tags={"mlflow.experimentKind": "custom_model_development"})

    def parent_run(self, spec_dict: dict, tags: dict[str, str]) -> str:
        """Create the sweep's parent run, or reattach to it (FINISHED runs are reopened)."""
        if self.state.get("parent"):
            self.client.update_run(self.state["parent"], status="RUNNING")  # a resumed sweep is running again
            return self.state["parent"]
        exp = self.experiment_id()
        run = self.client.create_run(exp, run_name=f"sweep {self.experiment}", tags=scrub(tags))
        params = flat_params(spec_dict)
        from mlflow.entities import Param

        self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in list(params.items())[:100]])
        self.state["parent"] = run.info.run_id
        self._save_state()
        return run.info.run_id

    def submit(self, op: dict) -> bool:
        """Run one operation now (with retries), or queue it. True if it reached MLflow."""
        if self.pending and not self._flush():
            self.pending.append(op)
            self._save_pending()
            return False
        if self._try(op):
            return True
        self.pending.append(op)
        self._save_pending()
        return False

    def _flush(self) -> bool:
        if self._down_since is not None and time.time() - self._down_since < 5:
            return False
        while self.pending:
            if not self._try(self.pending[0]):
                return False
            self.pending.pop(0)
            self._save_pending()
        return True

    def flush(self) -> int:
        """Replay queued operations; returns how many are still not logged."""
        self._down_since = None
        self._flush()
        return len(self.pending)

    def _try(self, op: dict, attempts: int = 3) -> bool:
        for attempt in range(attempts):
            try:
                self._apply(op)
                self._down_since = None
                return True
            except Exception as exc:  # any tracking error: retry, then queue; never kill the sweep
                last = exc
                time.sleep(0.5 * 2**attempt)
        if self._down_since is None:
            print(f"mlflow: {self.uri} is not answering ({type(last).__name__}); queuing, the sweep goes on", flush=True)
        self._down_since = time.time()
        return False

    def _apply(self, op: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind, trial = op["op"], op.get("trial")
        if kind == "create":
            self._ensure_run(trial, op)
            return
        run_id = self.state["runs"].get(trial) if trial else self.state.get("parent")
        if run_id is None:
            raise RuntimeError(f"no MLflow run for trial {trial} yet")
        if kind == "metrics":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in op["metrics"]]
            for i in range(0, len(metrics), 900):
                self.client.log_batch(run_id, metrics=metrics[i : i + 900])
            if trial:  # the parent's summary metrics have no curve to resume
                self.state["steps"][trial] = max(self.state["steps"].get(trial, -1), op["last_step"])
                self._save_state()
        elif kind == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in scrub(op["tags"]).items()])
        elif kind == "params":
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in op["params"].items()])
        elif kind == "end":
            self.client.set_terminated(run_id, status=op["status"])
        elif kind == "artifact":
            self.client.log_artifact(run_id, op["path"], op.get("dest"))
        elif kind == "text":
            self.client.log_text(run_id, op["text"], op["file"])

    def _ensure_run(self, trial: str, op: dict) -> None:
        if trial in self.state["runs"]:
            return
        exp = self.experiment_id()
        found = self.client.search_runs(
            [exp], filter_string=f"tags.sweep = '{op['sweep']}' and tags.trial_id = '{trial}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
        else:
            from mlflow.entities import Param

            tags = {"mlflow.parentRunId": self.state["parent"], **op["tags"]}
            run = self.client.create_run(exp, run_name=op["name"], tags=scrub(tags))
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in op["params"].items()])
        self.state["runs"][trial] = run_id
        self._save_state()

    def last_step(self, trial: str) -> int:
        return self.state["steps"].get(trial, -1)


class MlflowWriter(Callback):
    """Ray Tune callback (driver side) that turns trial events into MLflow operations."""

    def __init__(self, tracker: Tracker, sweep: str, flush_every: int = 4):
        self.tracker, self.sweep, self.flush_every = tracker, sweep, flush_every
        self._buffers: dict[str, list] = {}
        # trials whose l0 point this process has buffered: while MLflow is down their points are queued, so
        # tracker.last_step stays -1 and, without this, every emptied buffer took the l0 point again
        self._l0_buffered: set[str] = set()

    def __getstate__(self) -> dict:  # points still buffered are not kept: neither is the note that l0 was among them
        return {**self.__dict__, "_buffers": {}, "_l0_buffered": set()}

    def on_trial_start(self, iteration, trials, trial, **info):
        self._create(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._create(trial)
        if result.get("stalled"):  # the watchdog's reason, sent just before the trial fails; kept after a retry
            self.tracker.submit({"op": "tags", "trial": trial.trial_id, "tags": {"stalled": result["stalled"]}})
            return
        step = int(result.get("examples_seen", 0))
        if step <= self.tracker.last_step(trial.trial_id) and not result.get("done"):
            return  # a resumed trial re-reporting points already logged
        ts = int(time.time() * 1000)
        buf = self._buffers.setdefault(trial.trial_id, [])
        if (self.tracker.last_step(trial.trial_id) < 0 and trial.trial_id not in self._l0_buffered and not buf
                and isinstance(result.get("l0"), float)):
            # the held-out loss before training (l0) is the eval curve's point at 0 examples; logged first, it is
            # also the metric MLflow's compare page puts against the params by default
            buf.append(("eval_loss", float(result["l0"]), ts, 0))
            self._l0_buffered.add(trial.trial_id)
        for key in LOGGED_METRICS:
            value = result.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                buf.append((key, float(value), ts, step))
        if len(buf) >= self.flush_every * 8 or result.get("done"):
            self._flush(trial.trial_id, step)

    def _create(self, trial) -> None:
        if trial.trial_id in self.tracker.state["runs"] or getattr(trial, "_mlflow_asked", False):
            return
        trial._mlflow_asked = True
        cfg = trial.config
        name = f"{trial.trial_id.split('_')[-1]} {cfg.get('method', '')} lr={cfg.get('learning_rate', float('nan')):.2g}"
        if "batch_size" in cfg:
            name += f" bs={cfg['batch_size']}"
        self.tracker.submit({
            "op": "create", "trial": trial.trial_id, "sweep": self.sweep, "name": name,
            "tags": {"sweep": self.sweep, "trial_id": trial.trial_id, "method": str(cfg.get("method", "")),
                     **({"refine": str(cfg["refine"])} if cfg.get("refine") else {})},  # proposed by refinement round N
            "params": flat_params({k: v for k, v in cfg.items() if k not in NOT_SETTINGS}),
        })

    def _flush(self, trial_id: str, step: int) -> None:
        buf = self._buffers.pop(trial_id, [])
        if buf:
            self.tracker.submit({"op": "metrics", "trial": trial_id, "metrics": buf, "last_step": step})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, error=None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, error=trial_error(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        # The retry re-reports from its checkpoint: points still buffered would be logged twice.
        self._flush(trial.trial_id, int((trial.last_result or {}).get("examples_seen", 0)))
        self.tracker.submit({"op": "tags", "trial": trial.trial_id, "tags": {"retries": trial.num_failures}})

    def _end(self, trial, error: str | None) -> None:
        last = trial.last_result or {}
        self._create(trial)
        self._flush(trial.trial_id, int(last.get("examples_seen", 0)))
        stop = read_stops(self.tracker.sweep_dir / "stops.jsonl").get(trial.trial_id)
        outcome, reason = trial_outcome(last, stop, error)
        self.tracker.submit({"op": "tags", "trial": trial.trial_id, "tags": {"outcome": outcome, "reason": reason}})
        self.tracker.submit({"op": "end", "trial": trial.trial_id, "status": _RUN_STATUS[outcome]})


def trial_error(trial) -> str:
    """A Ray trial's last failure in one line (e.g. 'OutOfMemoryError: ...'); a default when Ray wrote none."""
    failures = error_lines(getattr(trial, "error_file", None))
    return failures[-1] if failures else "the trial process failed"
