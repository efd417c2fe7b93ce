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
from types import SimpleNamespace

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


def _running_with_checkpoints(sweep_dir: Path) -> bool:
    for result in sweep_dir.glob("run_trial_*/result.json"):
        try:
            text = result.read_text()
        except OSError:
            continue
        if '"done": true' not in text and text.count("\n") >= 3 and list(result.parent.glob("checkpoint_*")):
            return True
    return False


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
        if sig == signal.SIGKILL:  # once the next one has stored checkpoints, which Ray's saved state names
            _wait_for(lambda: _running_with_checkpoints(sweep_dir), 300, "a running trial with checkpoints")
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done_before = _finished_trials(sweep_dir)
    assert done_before < 5, "the sweep must have been interrupted midway"
    gone = []
    if sig == signal.SIGKILL:  # and the checkpoints of the trial still running are gone (Ray keeps one at a time)
        for trial_dir in sweep_dir.glob("run_trial_*"):
            result = trial_dir / "result.json"
            if not (result.is_file() and '"done": true' in result.read_text()) and list(trial_dir.glob("checkpoint_*")):
                gone.append(trial_dir.name.split("_")[2])
                for checkpoint in trial_dir.glob("checkpoint_*"):
                    subprocess.run(["rm", "-rf", str(checkpoint)], check=True)
    again = run_cli(["sweeps/run.py", str(spec), "--resume"], timeout=600, env={"MLFLOW_TRACKING_URI": uri})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    trials = _trials(tmp_path, name)
    assert len(trials) == 5 and all(t["final"].get("done") for t in trials)
    if sig == signal.SIGKILL:  # the trial whose checkpoints were deleted started again from step 0, in its own run
        assert [t["final"]["resumed_from_step"] for t in trials if t["trial_id"] in gone] == [0] * len(gone) != []
    client, children = _children(uri, name)
    assert len(children) == 5, "one MLflow run per trial: none lost, none duplicated"
    assert len({c.data.tags["trial_id"] for c in children}) == 5
    return out, again.stdout


def test_driver_killed_with_sigkill_then_resume_finishes_without_duplicates(tmp_path, tiny_model_dir):
    """... and the checkpoints of the trial that was running are deleted: it starts again from step 0."""
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
    assert proc.returncode == 3, out[-3000:]  # the sweep ran, MLflow does not have all of it yet
    last = out.strip().splitlines()[-1]
    assert "could not be written" in last and "mlflow_pending.jsonl" in last and "--resume" in last, last
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


# --- faults of the machine: a new store shared, a full disk, a hard-killed driver, the host out of memory -------

def _no_tracking_env() -> dict:
    """The environment of a sweep whose store is the default one, ``<output_dir>/mlflow.db``."""
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def _run_clean(args: list[str], env: dict) -> subprocess.Popen:
    full = {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _store_race_worker(uri: str, name: str, folder: str, barrier, out) -> None:
    from sweeps.launch.tracking import Tracker

    tracker = Tracker(uri, name, Path(folder))
    barrier.wait()
    out.put((name, tracker.parent_run({"name": name}, {"sweep": name, "sweep_dir": folder})))


def test_a_new_sqlite_store_is_created_by_one_process_at_a_time(tmp_path):
    """Three processes open one new SQLite store at the same instant: each gets its parent run (MLflow builds the
    schema once, under sweeps.faults.store_lock), none queues it."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = []
    for i in range(3):
        folder = tmp_path / f"s{i}"
        folder.mkdir()
        procs.append(ctx.Process(target=_store_race_worker, args=(uri, f"s{i}", str(folder), barrier, out)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    runs = dict(out.get(timeout=5) for _ in procs)
    assert all(runs.values()), runs
    client = MlflowClient(tracking_uri=uri)
    assert all(client.get_experiment_by_name(name) for name in runs)
    assert not any((tmp_path / f"s{i}" / "mlflow_pending.jsonl").exists() for i in range(3))


def test_two_sweeps_started_at_once_on_a_new_store_both_have_all_their_runs(tmp_path, tiny_model_dir):
    specs = [_spec(tmp_path, name, "  learning_rate: [0.001]") for name in ("twin_a", "twin_b")]
    env = _no_tracking_env()
    procs = [_run_clean(["sweeps/run.py", str(spec)], env) for spec in specs]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
        assert "could not be written" not in out + err
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    for name in ("twin_a", "twin_b"):
        client, children = _children(uri, name)
        parents = [r for r in client.search_runs([client.get_experiment_by_name(name).experiment_id])
                   if r.data.tags.get("role") == "sweep"]
        assert len(parents) == 1 and len(children) == 1, name
        assert children[0].info.status == "FINISHED" and children[0].data.tags["outcome"] == "completed"
        assert not (tmp_path / "out" / name / "mlflow_pending.jsonl").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 256 MiB tmpfs (root only), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    """Write one file until the file system is full; returns it."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_stops_the_sweep_with_one_line_and_resume_completes_it(tmp_path, small_disk, tiny_model_dir):
    """Output and the SQLite store on a small file system that fills up mid-sweep: one line naming the file it could
    not write, exit code 3, no traceback; once space is freed, --resume ends with every trial once in trials.json
    and in MLflow."""
    spec = _spec(tmp_path, "fulldisk", "  learning_rate: [0.001, 0.002, 0.003]", extra="")
    spec.write_text(spec.read_text().replace(f"output_dir: {tmp_path / 'out'}", f"output_dir: {small_disk}"))
    env = _no_tracking_env()
    sweep_dir = small_disk / "fulldisk"
    proc = _run_clean(["sweeps/run.py", str(spec)], env)
    try:
        _wait_for(lambda: any('"examples_seen": 8' in p.read_text() for p in sweep_dir.glob("run_trial_*/result.json")),
                  300, "a trial's first reports")
        filler = _fill(small_disk)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, out[-3000:] + err[-3000:]
    assert "Traceback" not in out + err, out[-3000:] + err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: no space left on device") and str(small_disk) in last and "--resume" in last, last
    filler.unlink()
    again = _run_clean(["sweeps/run.py", str(spec), "--resume"], env)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:] + err[-3000:]
    trials = json.loads((sweep_dir / "trials.json").read_text())
    assert len(trials) == 3 and len({t["trial_id"] for t in trials}) == 3
    assert all(t["final"].get("done") and t["outcome"] != "failed" for t in trials), [t["outcome"] for t in trials]
    _, children = _children(f"sqlite:///{small_disk / 'mlflow.db'}", "fulldisk")
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(t["trial_id"] for t in trials)
    assert all(c.info.status == "FINISHED" for c in children)
    assert not (sweep_dir / "mlflow_pending.jsonl").exists()


def _metrics(step: int) -> dict:
    return {"op": "metrics", "trial": "t1", "last_step": step,
            "metrics": [("lr", 1e-3, 1000 + step, step), ("train_loss", 10.0 / step, 1000 + step, step)]}


def _killed_between_writes(uri: str, folder: str, when: str) -> None:
    """A driver SIGKILLed inside its second metrics batch: before MLflow takes it, or after MLflow has and before
    mlflow.json says so."""
    from sweeps.launch.tracking import Tracker, create_op

    tracker = Tracker(uri, "killed", Path(folder))
    tracker.parent_run({"name": "killed"}, {"sweep": "killed", "sweep_dir": folder})
    tracker.submit(create_op("killed", "t1", {"method": "full", "learning_rate": 1e-3}))
    tracker.submit(_metrics(4))
    client, log_batch = tracker.client, tracker.client.log_batch

    def killed(*args, **kwargs):
        if when == "after":
            log_batch(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    client.log_batch = killed
    tracker.submit(_metrics(8))


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_driver_killed_between_mlflow_and_its_own_record_logs_each_point_once(tmp_path, when):
    """The kill lands between MLflow's write of a metrics batch and mlflow.json's (or just before MLflow's). The
    resumed driver looks the batch up (Tracker.settle): it counts as logged when MLflow has it, and is written once
    more when it has not; a replay of that same batch, from a queue or a restarted trial, adds no point twice."""
    import multiprocessing

    from sweeps.launch.tracking import MlflowWriter, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = multiprocessing.get_context("spawn").Process(target=_killed_between_writes, args=(uri, str(tmp_path), when))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    tracker = Tracker(uri, "killed", tmp_path)
    tracker.settle()
    assert tracker.last_step("t1") == (8 if when == "after" else 4)
    tracker.submit(_metrics(8))  # the killed driver's queue, replayed
    # the trial, started again from its beginning, reports every point again (new timestamps): the writer skips
    # what MLflow holds
    writer, trial = MlflowWriter(tracker, "killed", flush_every=1), SimpleNamespace(trial_id="t1", config={})
    for step in (4, 8, 12):
        writer.on_trial_result(0, [], trial, {"examples_seen": step, "train_loss": 9.0 / step, "done": step == 12})
    history = MlflowClient(tracking_uri=uri).get_metric_history(tracker.state["runs"]["t1"], "train_loss")
    assert sorted(m.step for m in history) == [4, 8, 12]
    assert tracker.last_step("t1") == 12


def test_driver_sigkilled_a_second_after_a_trial_completes_loses_nothing(tmp_path, tiny_model_dir):
    """The driver's process group is SIGKILLed one second after a trial completes. Ray saves its state every 10 s
    or more; here only when the sweep starts (TUNE_GLOBAL_CHECKPOINT_S, and no checkpoints to force a save), so its
    saved state knows neither that the first trial completed nor the second one, which had started. After
    --resume: the completed trial is finished in trials.json with one MLflow run, the second started again from
    its beginning in its own run, and no Optuna trial is left RUNNING."""
    import optuna

    spec = _spec(tmp_path, "hardkill", "  learning_rate: [0.001, 0.002]")
    spec.write_text(spec.read_text().replace("search: {algorithm: grid}", "search: {algorithm: grid, max_concurrent: 1}"))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "TUNE_GLOBAL_CHECKPOINT_S": "1000"}
    sweep_dir = tmp_path / "out" / "hardkill"
    proc = _popen(["sweeps/run.py", str(spec), "failure.checkpoint_every=0"], env)
    completed = None
    try:
        for line in proc.stdout:
            match = re.search(r"\] completed +(\w+) ", line)
            if match:
                completed = match.group(1)
                break
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert completed, "a trial completed before the kill"
    again = run_cli(["sweeps/run.py", str(spec), "--resume", "failure.checkpoint_every=0"], timeout=600, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    trials = {t["trial_id"]: t for t in _trials(tmp_path, "hardkill")}
    assert len(trials) == 2 and all(t["final"].get("done") for t in trials.values()), trials.keys()
    assert completed in trials and trials[completed]["outcome"] != "failed"
    assert sorted(t["config"]["learning_rate"] for t in trials.values()) == [0.001, 0.002], "each grid cell once"
    client, children = _children(env["MLFLOW_TRACKING_URI"], "hardkill")
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(trials), "one MLflow run per trial"
    assert all(c.info.status == "FINISHED" for c in children)
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert len(steps) == len(set(steps)), "no metric point is logged twice"
    study = optuna.load_study(study_name="hardkill", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]


def _used_memory() -> int:
    """Host memory in use as Ray's memory monitor counts it: the cgroup's usage less its inactive page cache."""
    for usage, stat, inactive in (("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
                                  ("/sys/fs/cgroup/memory/memory.usage_in_bytes", "/sys/fs/cgroup/memory/memory.stat",
                                   "total_inactive_file")):
        if Path(usage).is_file() and Path(stat).is_file():
            stats = dict(line.split() for line in Path(stat).read_text().splitlines() if len(line.split()) == 2)
            return int(Path(usage).read_text()) - int(stats.get(inactive, 0))
    meminfo = dict(ln.split(":", 1) for ln in Path("/proc/meminfo").read_text().splitlines())
    return (int(meminfo["MemTotal"].split()[0]) - int(meminfo["MemAvailable"].split()[0])) * 1024


def _total_memory() -> int:
    return int(Path("/proc/meminfo").read_text().split()[1]) * 1024  # MemTotal, the monitor's limit without a cgroup one


def test_a_worker_killed_by_rays_memory_monitor_fails_its_trial_and_the_sweep_goes_on(tmp_path, tiny_model_dir):
    """One trial takes host memory (hog@2) until Ray's memory monitor, set just above what the host uses now, kills
    its worker: that trial is failed as "host out of memory (Ray's memory monitor)", the other finishes, the
    findings count the failure and the sweep exits 0."""
    threshold = min(0.9, (_used_memory() + (5 << 30)) / _total_memory())  # 5 GiB above what the host uses now
    spec = _spec(tmp_path, "hostoom", '  fault: [null, "hog@2"]')
    spec.write_text(spec.read_text().replace("search: {algorithm: grid}", "search: {algorithm: grid, max_concurrent: 1}"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["sweeps/run.py", str(spec), "failure.max_retries=0"], timeout=600,
                   env={"MLFLOW_TRACKING_URI": uri, "RAY_memory_usage_threshold": f"{threshold:.3f}",
                        "RAY_memory_monitor_refresh_ms": "100"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    trials = {t["config"]["fault"]: t for t in _trials(tmp_path, "hostoom")}
    assert trials["hog@2"]["outcome"] == "failed" and trials["hog@2"]["error"] == "host out of memory (Ray's memory monitor)"
    assert trials[None]["final"].get("done") and trials[None]["outcome"] != "failed"
    findings = proc.stdout.split("findings:")[1]
    assert "1 failed" in findings, findings
    _, children = _children(uri, "hostoom")
    run = next(c for c in children if c.data.params["fault"] == "hog@2")
    assert run.info.status == "FAILED" and run.data.tags["reason"] == "host out of memory (Ray's memory monitor)"
