"""Faults with real processes: a killed trial, a killed driver, Ctrl-C, a stopped MLflow server, OOM.

Each test runs the real sweep command on the tiny model and checks what a user
would check afterwards: the trials, the MLflow runs (counted), the Optuna study.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


def _spec(tmp_path: Path, name: str, space: str, train: str = "", extra: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""name: {name}
model: tiny
data: {{train: "builtin:facts:16", eval: "builtin:facts-heldout:16"}}
train: {{epochs: 2, batch_size: 4, seq_len: 48, report_every: 4, eval_every: 16, memorization: false,
        forgetting: false, method: full{train}}}
search: {{algorithm: grid}}
space:
{space}
pruning: {{rule: none}}
failure: {{max_retries: 1, checkpoint_every: 1}}
output_dir: {tmp_path / 'out'}
{extra}""")
    return path


def _children(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _trials(tmp_path: Path, name: str) -> list[dict]:
    return json.loads((tmp_path / "out" / name / "trials.json").read_text())


def _popen(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(predicate, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _finished_trials(sweep_dir: Path) -> int:
    state = sweep_dir / "mlflow.json"
    if not state.is_file():
        return 0
    try:
        return sum(1 for d in sweep_dir.glob("run_trial_*/result.json") if '"done": true' in d.read_text())
    except OSError:
        return 0


def _sweep_with_fault(tmp_path: Path, name: str, fault: str, overrides: tuple[str, ...] = ()) -> tuple[str, dict]:
    """A 2-trial sweep, one trial healthy and one with ``fault``; the store URI and the trials by fault."""
    spec = _spec(tmp_path, name, f'  fault: [null, "{fault}"]')
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["sweeps/run.py", str(spec), *overrides], timeout=600, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return uri, {t["config"]["fault"]: t for t in _trials(tmp_path, name)}


def test_a_trial_killed_with_sigkill_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    uri, trials = _sweep_with_fault(tmp_path, "killtrial", "crash@5")
    crashed = trials["crash@5"]
    assert crashed["final"]["status"] == "completed", crashed
    assert crashed["final"]["resumed_from_step"] >= 4, "the retry must start from the checkpoint, not from step 0"
    assert crashed["history"][-1]["step"] == crashed["final"]["total_steps"]
    client, children = _children(uri, "killtrial")
    assert len(children) == 2
    run = next(c for c in children if c.data.params["fault"] == "crash@5")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(steps) == len(set(steps)), "no metric point is logged twice"


def test_failed_out_of_memory_trial_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_model_dir):
    uri, trials = _sweep_with_fault(tmp_path, "oom", "oom@2")
    assert trials["oom@2"]["outcome"] == "failed" and "out of memory" in trials["oom@2"]["error"]
    assert trials[None]["outcome"] != "failed"
    _, children = _children(uri, "oom")
    failed = next(c for c in children if c.data.params["fault"] == "oom@2")
    assert failed.info.status == "FAILED" and failed.data.tags["reason"] == "out of memory at step 2"


def _optuna_trial(tmp_path: Path, name: str, fault: str):
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'out' / name / 'optuna.db'}")
    return next(t for t in study.trials if t.user_attrs.get("fault") == fault)  # a grid cell's values: user attrs


STALL = "no report for 5 s after step 2"  # hang@3: the report of step 2 was the last


def test_a_hung_trial_is_failed_by_the_watchdog_and_its_retry_completes(tmp_path, tiny_model_dir):
    uri, trials = _sweep_with_fault(tmp_path, "hang", "hang@3", ("failure.stall_s=5",))
    hung = trials["hang@3"]
    assert hung["final"]["failures"] == [STALL], "the stall is recorded, though the retry completed"
    assert hung["final"]["done"] and hung["final"]["resumed_from_step"] == 2, "retried once, from its checkpoint"
    assert hung["outcome"] != "failed" and hung["error"] is None, "after the retry the curve says how it ended"
    assert trials[None]["final"]["done"] and "failures" not in trials[None]["final"]
    client, children = _children(uri, "hang")
    assert len(children) == 2, "one MLflow run per trial, the retry included"
    run = next(c for c in children if c.data.params["fault"] == "hang@3")
    assert run.data.tags["stalled"] == STALL and run.data.tags["retries"] == "1" and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(steps) == len(set(steps)), "no metric point is logged twice"
    ot = _optuna_trial(tmp_path, "hang", "hang@3")
    assert ot.state.name == "COMPLETE" and ot.user_attrs["stalls"] == [STALL]


def test_a_hung_trial_without_retries_stays_failed_with_the_stall_reason(tmp_path, tiny_model_dir):
    uri, trials = _sweep_with_fault(tmp_path, "hang0", "hang@3", ("failure.stall_s=5", "failure.max_retries=0"))
    assert trials["hang@3"]["outcome"] == "failed" and trials["hang@3"]["error"] == STALL
    assert trials[None]["outcome"] != "failed" and trials[None]["final"]["done"]
    _, children = _children(uri, "hang0")
    run = next(c for c in children if c.data.params["fault"] == "hang@3")
    assert len(children) == 2 and run.info.status == "FAILED" and run.data.tags["reason"] == STALL
    ot = _optuna_trial(tmp_path, "hang0", "hang@3")
    assert ot.state.name == "FAIL" and ot.user_attrs["stalls"] == [STALL]


def test_a_time_budget_ends_the_sweep_and_resume_finishes_it(tmp_path, tiny_model_dir):
    """hang@3 never ends by itself (the watchdog's default patience is 300 s): only the budget can end this sweep."""
    spec = _spec(tmp_path, "budget", '  fault: [null, "hang@3"]')
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = run_cli(["sweeps/run.py", str(spec), "--time-budget", "20"], timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wall = float(re.search(r"wall time: +(\d+) s", proc.stdout).group(1))
    assert wall < 20 + 30, "the trials stop when the budget is spent, not when they are done"
    assert "the time budget (20 s) was spent" in proc.stdout and "--resume" in proc.stdout
    assert "findings:" in proc.stdout and (tmp_path / "out" / "budget" / "report" / "report.html").is_file()
    assert {t["config"]["fault"]: t["outcome"] for t in _trials(tmp_path, "budget")}["hang@3"] == "unfinished"
    # Had the budget come before hang@3's first checkpoint, its rerun would hang again: the watchdog then retries
    # it from a checkpoint. More patience or less is the same sweep to --resume.
    again = run_cli(["sweeps/run.py", str(spec), "--resume", "failure.stall_s=5"], timeout=600, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    trials = _trials(tmp_path, "budget")
    assert len(trials) == 2 and all(t["final"].get("done") for t in trials)
    _, children = _children(env["MLFLOW_TRACKING_URI"], "budget")
    assert len(children) == 2 and len({c.data.tags["trial_id"] for c in children}) == 2, "no MLflow run duplicated"
    assert all(c.info.status == "FINISHED" for c in children)


def _kill_midway_then_resume(tmp_path: Path, sig: int, name: str):
    spec = _spec(tmp_path, name, "  learning_rate: [0.001, 0.002, 0.003, 0.004, 0.005]")
    spec.write_text(spec.read_text().replace("search: {algorithm: grid}", "search: {algorithm: grid, max_concurrent: 1}"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir = tmp_path / "out" / name
    proc = _popen(["sweeps/run.py", str(spec)], {"MLFLOW_TRACKING_URI": uri})
    try:
        _wait_for(lambda: _finished_trials(sweep_dir) >= 2, 300, "two finished trials")
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done_before = _finished_trials(sweep_dir)
    assert done_before < 5, "the sweep must have been interrupted midway"
    again = run_cli(["sweeps/run.py", str(spec), "--resume"], timeout=600, env={"MLFLOW_TRACKING_URI": uri})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    trials = _trials(tmp_path, name)
    assert len(trials) == 5 and all(t["final"].get("done") for t in trials)
    client, children = _children(uri, name)
    assert len(children) == 5, "one MLflow run per trial: none lost, none duplicated"
    assert len({c.data.tags["trial_id"] for c in children}) == 5
    return out, again.stdout


def test_driver_killed_with_sigkill_then_resume_finishes_without_duplicates(tmp_path, tiny_model_dir):
    _kill_midway_then_resume(tmp_path, signal.SIGKILL, "killdriver")


def test_ctrl_c_stops_cleanly_and_can_be_resumed(tmp_path, tiny_model_dir):
    out, _ = _kill_midway_then_resume(tmp_path, signal.SIGINT, "ctrlc")
    assert "Traceback" not in out
    assert "--resume" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(store: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--default-artifact-root", f"file://{store / 'art'}",
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    _wait_for(up, 90, "the mlflow server")
    return proc


def test_mlflow_server_stopped_mid_sweep_the_sweep_completes_and_logs_once_back(tmp_path, tiny_model_dir):
    store = tmp_path / "store"
    store.mkdir()
    port = _free_port()
    server = _mlflow_server(store, port)
    uri = f"http://127.0.0.1:{port}"
    spec = _spec(tmp_path, "serverdown", "  learning_rate: [0.001, 0.002, 0.003, 0.004]")
    sweep_dir = tmp_path / "out" / "serverdown"
    proc = _popen(["sweeps/run.py", str(spec)], {"MLFLOW_TRACKING_URI": uri})
    try:
        _wait_for(lambda: _finished_trials(sweep_dir) >= 1, 300, "a finished trial")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)
        out, _ = proc.communicate(timeout=600)
    finally:
        for p in (proc, server):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert "could not be logged" in out and "mlflow_pending.jsonl" in out
    assert (sweep_dir / "mlflow_pending.jsonl").is_file()
    server = _mlflow_server(store, port)
    try:
        again = run_cli(["sweeps/run.py", str(spec), "--resume"], timeout=600, env={"MLFLOW_TRACKING_URI": uri})
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        client, children = _children(uri, "serverdown")
        assert len(children) == 4 and all(c.info.status != "RUNNING" for c in children)
        assert not (sweep_dir / "mlflow_pending.jsonl").exists()
        # once back, and once only: the points kept while the server was down are not logged again on top of those
        # that got through: each metric has one point per step, and train_loss one per report of the trial
        reports = {t["trial_id"]: [row["examples_seen"] for row in t["history"] if row.get("train_loss") is not None]
                   for t in _trials(tmp_path, "serverdown")}
        for child in children:
            trial = child.data.tags["trial_id"]
            for key in child.data.metrics:
                steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
                assert len(steps) == len(set(steps)), f"{trial}: {key} logged twice at a step: {sorted(steps)}"
            train = sorted(m.step for m in client.get_metric_history(child.info.run_id, "train_loss"))
            assert train == reports[trial] and len(train) == 8, trial  # 2 epochs x 16 facts / batch 4, a report a step
    finally:
        os.killpg(server.pid, signal.SIGKILL)
