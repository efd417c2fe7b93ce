"""MLflow, written from the driver only: one parent run per sweep, one child run per trial.

Trials never write to MLflow: one writer means no SQLite lock contention and no
lost runs when a trial process dies. Every MLflow call is retried; what still
fails (a stopped tracking server, a full or read-only store; the sweep's parent
run too) is queued in memory and in ``mlflow_pending.jsonl`` and replayed when
the server answers again, at the end of the sweep, or on ``--resume``; what is
still queued at the end is the sweep's last line (exit code 3). Metric points are
the one write MLflow would take twice: each batch is noted before it is sent, and
a resume looks up what a hard kill left unnoted (``Tracker.settle``). The trial -> run
map lives in ``mlflow.json`` in the sweep folder and is checked against MLflow's
own tags, so a resumed sweep reattaches to its runs and never duplicates them.
At the end ``Tracker.catch_up`` brings MLflow up to the sweep folder (what a
killed driver or a full disk left unlogged). A new SQLite store is created
under a lock (``sweeps.faults.store_lock``): two sweeps may start at once.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

# LOGGED_METRICS, error_lines, trial_outcome live in sweeps.results.records and stay importable from here
from sweeps.faults import atomic_write, problem, store_lock
from sweeps.results.records import LOGGED_METRICS, Status, error_lines, read_stops, scrub, trial_outcome
from sweeps.spec import sampled_settings

# mlflow is imported where the client is first used: the progress printer imports this module without it

log = logging.getLogger(__name__)

_RUN_STATUS = {Status.COMPLETED: "FINISHED", Status.PRUNED: "KILLED", Status.DIVERGED: "KILLED", Status.FAILED: "FAILED"}


def why_not(exc: BaseException) -> str:
    """Why an MLflow operation failed, in words: a full disk or a read-only store, else a server not answering."""
    why = problem(exc)
    return f"could not write: {why}" if why else f"not answering ({type(exc).__name__})"


def configure_client_timeouts() -> None:
    """A dead server must cost seconds, not MLflow's default minutes of retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


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
        self.why = "not answering"  # why the last operation could not be written

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
        atomic_write(self.sweep_dir / "mlflow.json", json.dumps(self.state, indent=1))

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
        if self.pending:  # a full disk leaves the previous queue whole (and raises StorageProblem: the sweep stops)
            atomic_write(path, "".join(json.dumps(op) + "\n" for op in self.pending))
        elif path.exists():
            path.unlink()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_state": None, "_pending": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            with store_lock(self.uri):  # a new SQLite store's schema is built here, by one sweep at a time
                client = MlflowClient(tracking_uri=self.uri)
                client.search_experiments(max_results=1)
            self._client = client
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

    def parent_run(self, spec_dict: dict, tags: dict[str, str]) -> str | None:
        """Create the sweep's parent run, or reattach to it (FINISHED runs are reopened); None when MLflow cannot
        take it now: the request is queued first, so the trials' runs follow it when it is replayed."""
        op = {"op": "parent", "trial": None, "params": flat_params(spec_dict), "tags": scrub(tags)}
        if not self.pending and self._try(op):
            return self.state["parent"]
        if not any(p["op"] == "parent" for p in self.pending):
            self.pending.insert(0, op)
            self._save_pending()
        return None

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
                if problem(exc):  # a full disk or a read-only store does not heal in seconds
                    break
                time.sleep(0.5 * 2**attempt)
        if self._down_since is None:
            self.why = why_not(last)
            print(f"mlflow: {self.uri}: {self.why}; queuing, the sweep goes on", flush=True)
        self._down_since = time.time()
        return False

    def _apply(self, op: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind, trial = op["op"], op.get("trial")
        if kind == "create":
            self._ensure_run(trial, op)
            return
        if kind == "parent":
            self._create_parent(op)
            return
        run_id = self.state["runs"].get(trial) if trial else self.state.get("parent")
        if run_id is None:
            raise RuntimeError(f"no MLflow run for trial {trial} yet")
        if kind == "metrics":
            if trial and self._landed(trial, op):
                return  # this very operation reached MLflow before a hard kill or a lost answer
            if trial:  # noted before MLflow writes: a kill between its write and mlflow.json's is found (_landed)
                last = {"point": list(op["metrics"][-1]), "last_step": op["last_step"]}
                self.state.setdefault("inflight", {})[trial] = last
                self._save_state()
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in op["metrics"]]
            for i in range(0, len(metrics), 900):
                self.client.log_batch(run_id, metrics=metrics[i : i + 900])
            if trial:  # the parent's summary metrics have no curve to resume
                self.state["steps"][trial] = max(self.state["steps"].get(trial, -1), op["last_step"])
                self.state["inflight"].pop(trial, None)
                self._save_state()
        elif kind == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in scrub(op["tags"]).items()])
        elif kind == "params":
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in op["params"].items()])
        elif kind == "end":
            self.client.set_terminated(run_id, status=op["status"])
            if trial:  # the run has its outcome: a resume or the end of the sweep need not end it again
                self.state.setdefault("ended", {})[trial] = op["status"]
                self._save_state()
        elif kind == "artifact":
            self.client.log_artifact(run_id, op["path"], op.get("dest"))
        elif kind == "text":
            self.client.log_text(run_id, op["text"], op["file"])

    def settle(self) -> None:
        """After a hard kill: the metrics a killed driver had sent to MLflow but not yet noted in mlflow.json are
        looked up, so a resume neither logs them twice nor misses them. Left for later while MLflow does not answer."""
        try:
            for trial in list(self.state.get("inflight", {})):
                self._landed(trial)
        except Exception:  # MLflow not answering: each trial's next operation looks again (_apply)
            pass

    def _landed(self, trial: str, op: dict | None = None) -> bool:
        """Whether ``op`` (a trial's metrics) already reached MLflow though mlflow.json does not say so: a kill, or
        a lost answer, between the two writes. Its last point is looked up once; a point found counts as logged, and
        the note stays, so a replay of that same operation (the queue of a killed driver) is not written twice."""
        mark = self.state.get("inflight", {}).get(trial)
        if mark is None:
            return False
        if "landed" not in mark:
            key, _, ts, step = mark["point"]
            history = self.client.get_metric_history(self.state["runs"][trial], key)
            mark["landed"] = any(m.step == step and m.timestamp == ts for m in history)
            if mark["landed"]:
                self.state["steps"][trial] = max(self.state["steps"].get(trial, -1), mark["last_step"])
            self._save_state()
        return mark["landed"] and op is not None and list(op["metrics"][-1]) == mark["point"]

    def _create_parent(self, op: dict) -> None:
        if self.state.get("parent"):
            self.client.update_run(self.state["parent"], status="RUNNING")  # a resumed sweep is running again
            return
        from mlflow.entities import Param

        exp = self.experiment_id()
        found = self.client.search_runs(  # created by an earlier try whose answer was lost
            [exp], filter_string=f"tags.role = 'sweep' and tags.sweep_dir = '{op['tags'].get('sweep_dir', '')}'",
            max_results=1)
        run_id = found[0].info.run_id if found else self.client.create_run(
            exp, run_name=f"sweep {self.experiment}", tags=op["tags"]).info.run_id
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in list(op["params"].items())[:100]])
        self.state["parent"] = run_id
        self._save_state()

    def _ensure_run(self, trial: str, op: dict) -> None:
        if trial in self.state["runs"]:
            return
        reuse = self.state["runs"].get(op.get("reuse") or "")
        if reuse:  # the trial a resume started again under a new id (sweeps.launch.pruning): one run, the points not twice
            self._landed(op["reuse"])  # every point its earlier attempt logged is counted, even one a kill left unnoted
            from mlflow.entities import RunTag

            self.client.log_batch(reuse, tags=[RunTag("trial_id", trial), RunTag("mlflow.runName", op["name"])])
            self.state["runs"][trial] = reuse
            self.state["steps"][trial] = self.state["steps"].get(op["reuse"], -1)
            self._save_state()
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

    def catch_up(self, sweep: str, records: list, results: dict[str, list[dict]]) -> None:
        """Bring MLflow up to the sweep folder, the record that survives a killed driver or a full disk: every
        trial has its run (found by its tags, never a second), every point its results hold past the last one
        logged, and every finished trial its outcome and end. A sweep that ran whole has nothing to add here."""
        queued = {(op["op"], op.get("trial")) for op in self.pending}  # written once MLflow answers: counted as done
        ended = set(self.state.get("ended", {})) | {t for kind, t in queued if kind == "end"}
        for r in records:
            if r.trial_id not in self.state["runs"] and ("create", r.trial_id) not in queued:
                self.submit(create_op(sweep, r.trial_id, {**r.params, **({"refine": r.refine} if r.refine else {})}))
            last = max([self.last_step(r.trial_id)] + [op["last_step"] for op in self.pending
                                                       if op["op"] == "metrics" and op.get("trial") == r.trial_id])
            # past the last point logged; and the final report (its summary metrics share the last report's
            # examples_seen) while the run has not been ended, which comes after it
            todo = [x for x in results.get(r.trial_id, []) if "stalled" not in x and (
                int(x.get("examples_seen", 0)) > last or (x.get("done") and r.trial_id not in ended))]
            batch = [p for i, x in enumerate(todo) for p in points(x, first=last < 0 and i == 0)]
            if batch:
                self.submit({"op": "metrics", "trial": r.trial_id, "metrics": batch,
                             "last_step": max(int(x.get("examples_seen", 0)) for x in todo)})
            finished = r.final.get("done") or r.error or r.stopped_by
            if finished and r.trial_id not in ended:
                outcome, reason = trial_outcome(r.final, r.stopped_by, r.error)
                self.submit({"op": "tags", "trial": r.trial_id, "tags": {"outcome": outcome, "reason": reason}})
                self.submit({"op": "end", "trial": r.trial_id, "status": _RUN_STATUS[outcome]})


class MlflowWriter(Callback):
    """Ray Tune callback (driver side) that turns trial events into MLflow operations."""

    def __init__(self, tracker: Tracker, sweep: str, flush_every: int = 4, ready=None):
        """``ready``: a future of the sweep's parent run, awaited before the first operation (runs go under it)."""
        self._tracker, self.sweep, self.flush_every, self._ready = tracker, sweep, flush_every, ready
        self._buffers: dict[str, list] = {}
        # trials whose l0 point this process has buffered: while MLflow is down their points are queued, so
        # tracker.last_step stays -1 and, without this, every emptied buffer took the l0 point again
        self._l0_buffered: set[str] = set()

    def __getstate__(self) -> dict:  # points still buffered are not kept: neither is the note that l0 was among them
        return {**self.__dict__, "_buffers": {}, "_l0_buffered": set(), "_ready": None}

    @property
    def tracker(self) -> Tracker:
        if self._ready is not None:  # the parent run is being created in another thread: wait for it once
            self._ready.result()
            self._ready = None
        return self._tracker

    def on_trial_start(self, iteration, trials, trial, **info):
        self._create(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._create(trial)
        if result.get("replayed"):
            return  # a trial that had ended before a hard kill, said again on a resume (sweeps.launch.resume): logged
        if result.get("stalled"):  # the watchdog's reason, sent just before the trial fails; kept after a retry
            self.tracker.submit({"op": "tags", "trial": trial.trial_id, "tags": {"stalled": result["stalled"]}})
            return
        step = int(result.get("examples_seen", 0))
        if step <= self.tracker.last_step(trial.trial_id) and not result.get("done"):
            return  # a resumed trial re-reporting points already logged
        buf = self._buffers.setdefault(trial.trial_id, [])
        first = self.tracker.last_step(trial.trial_id) < 0 and trial.trial_id not in self._l0_buffered and not buf
        buf += points(result, first=first)
        if first:  # while MLflow is down the points are queued and last_step stays -1: l0 is buffered once
            self._l0_buffered.add(trial.trial_id)
        if len(buf) >= self.flush_every * 8 or result.get("done"):
            self._flush(trial.trial_id, step)

    def _create(self, trial) -> None:
        if trial.trial_id in self.tracker.state["runs"] or getattr(trial, "_mlflow_asked", False):
            return
        trial._mlflow_asked = True
        self.tracker.submit(create_op(self.sweep, trial.trial_id, trial.config))

    def _flush(self, trial_id: str, step: int) -> None:
        buf = self._buffers.pop(trial_id, [])
        if buf:
            self.tracker.submit({"op": "metrics", "trial": trial_id, "metrics": buf, "last_step": step})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, error=None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, error=trial_error(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._create(trial)  # a trial that failed before it started (its worker killed) has no run yet
        # The retry re-reports from its checkpoint: points still buffered would be logged twice.
        self._flush(trial.trial_id, int((trial.last_result or {}).get("examples_seen", 0)))
        self.tracker.submit({"op": "tags", "trial": trial.trial_id, "tags": {"retries": trial.num_failures}})

    def _end(self, trial, error: str | None) -> None:
        last = trial.last_result or {}
        if last.get("replayed") and trial.trial_id in self.tracker.state.get("ended", {}):
            return  # its run has its outcome (else sweeps.launch.finish catches it up)
        self._create(trial)
        self._flush(trial.trial_id, int(last.get("examples_seen", 0)))
        stop = read_stops(self.tracker.sweep_dir / "stops.jsonl").get(trial.trial_id)
        outcome, reason = trial_outcome(last, stop, error)
        self.tracker.submit({"op": "tags", "trial": trial.trial_id, "tags": {"outcome": outcome, "reason": reason}})
        self.tracker.submit({"op": "end", "trial": trial.trial_id, "status": _RUN_STATUS[outcome]})


def points(result: dict, first: bool) -> list[tuple]:
    """One report as MLflow metric points (key, value, timestamp, step = examples seen); ``first``: the curve's
    first report, which also gives the held-out loss before training (l0) as the eval curve's point at 0 examples,
    logged first: it is the metric MLflow's compare page puts against the params by default."""
    ts, step = int(time.time() * 1000), int(result.get("examples_seen", 0))
    out = [("eval_loss", float(result["l0"]), ts, 0)] if first and isinstance(result.get("l0"), float) else []
    for key in LOGGED_METRICS:
        value = result.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append((key, float(value), ts, step))
    return out


def create_op(sweep: str, trial_id: str, cfg: dict) -> dict:
    """The operation that creates a trial's run (or finds it by its tags: never two runs for one trial)."""
    name = f"{trial_id.split('_')[-1]} {cfg.get('method', '')} lr={cfg.get('learning_rate', float('nan')):.2g}"
    if "batch_size" in cfg:
        name += f" bs={cfg['batch_size']}"
    return {
        "op": "create", "trial": trial_id, "sweep": sweep, "name": name,
        "tags": {"sweep": sweep, "trial_id": trial_id, "method": str(cfg.get("method", "")),
                 **({"refine": str(cfg["refine"])} if cfg.get("refine") else {})},  # proposed by refinement round N
        "params": flat_params(sampled_settings(cfg)),
        **({"reuse": cfg["restart_of"]} if cfg.get("restart_of") else {}),
    }


def trial_error(trial) -> str:
    """A Ray trial's last failure in one line (e.g. 'OutOfMemoryError: ...'); a default when Ray wrote none."""
    failures = error_lines(getattr(trial, "error_file", None))
    return failures[-1] if failures else "the trial process failed"
