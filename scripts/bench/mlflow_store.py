"""Scale of the MLflow store: what logging costs, and what the UI's experiment page costs to load.

    python scripts/bench/mlflow_store.py              # 2,000 points x 3 reps; a sweep of 100 trials x 200 points
    python scripts/bench/mlflow_store.py --quick      # 500 points x 1 rep; 10 trials x 50 points (a smoke run)

1. Logging: ``MlflowClient.log_batch`` (batches of up to 1,000 metrics, the
   REST limit) against one ``log_metric`` call per point, on a fresh SQLite
   store in a temp dir; each rep logs ``--points`` points (5 metric keys, as a
   trial reports train_loss, eval_loss, lr, ...) into a new run, the two ways
   interleaved; the cost is given per 1,000 points, median over reps.
2. The UI: a synthetic sweep (one parent run, ``--trials`` child runs tagged
   ``mlflow.parentRunId``, ``--points-per-trial`` points of train_loss each,
   logged with log_batch) is served by ``mlflow server`` on 127.0.0.1 and a
   free port; the REST calls the experiment page makes are timed (median of 5
   after one warm-up call): runs/search (max_results 100), get-history of one
   run, the charts' get-history-bulk-interval for 10 runs, and the index page.
   The server (its own process group) is stopped at the end.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a file: import this checkout's packages

HEADER_LOG = "| call | calls per 1,000 points | ms per 1,000 points | x log_batch |"
HEADER_UI = "| request (UI experiment page) | median ms | response KB |"
_KEYS = ("train_loss", "train_loss_ema", "eval_loss", "grad_norm", "lr")  # what a trial reports
_BATCH_LIMIT = 1000  # MLflow's log_batch limit on metrics per call
_UI_REPEATS = 5


def _points(n: int):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(_KEYS[i % len(_KEYS)], 1.0 / (1 + i), now + i, i // len(_KEYS)) for i in range(n)]


def _log_batch(client, run_id: str, points) -> None:
    for start in range(0, len(points), _BATCH_LIMIT):
        client.log_batch(run_id, metrics=points[start : start + _BATCH_LIMIT])


def _log_single(client, run_id: str, points) -> None:
    for m in points:
        client.log_metric(run_id, m.key, m.value, timestamp=m.timestamp, step=m.step)


def bench_logging(tmp: Path, n_points: int, reps: int) -> list[dict]:
    """Seconds per 1,000 points, both ways, alternating, each rep into a fresh run of one fresh store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'logging.db'}")
    experiment = client.create_experiment("logging-cost")  # creates the schema before anything is timed
    ways = {"log_batch": _log_batch, "log_metric": _log_single}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(reps):
        for name, log in ways.items():
            run_id = client.create_run(experiment, run_name=name).info.run_id
            points = _points(n_points)
            t0 = time.perf_counter()
            log(client, run_id, points)
            seconds[name].append(time.perf_counter() - t0)
            client.set_terminated(run_id)
            stored = len(client.get_metric_history(run_id, _KEYS[0]))
            if stored != len(range(0, n_points, len(_KEYS))):
                raise RuntimeError(f"{name}: {stored} points of {_KEYS[0]} stored, expected {len(range(0, n_points, len(_KEYS)))}")
    base = statistics.median(seconds["log_batch"])
    return [
        {"call": name, "calls_per_1000": 1000 / _BATCH_LIMIT if name == "log_batch" else 1000,
         "ms_per_1000": statistics.median(s) * 1000 * 1000 / n_points, "vs_batch": statistics.median(s) / base,
         "seconds": s}
        for name, s in seconds.items()
    ]


def build_sweep(uri: str, trials: int, points: int) -> tuple[str, list[str], float]:
    """One parent run and ``trials`` child runs with ``points`` train_loss points each; returns ids and seconds."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    t0 = time.perf_counter()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("synthetic-sweep")
    parent = client.create_run(experiment, run_name="sweep synthetic").info.run_id
    children = []
    for t in range(trials):
        run_id = client.create_run(experiment, run_name=f"trial {t}", tags={"mlflow.parentRunId": parent}).info.run_id
        now = int(time.time() * 1000)
        curve = [Metric("train_loss", 3.0 / (1 + 0.05 * s) + 0.01 * (t % 7), now + s, s) for s in range(points)]
        params = [Param("learning_rate", f"{10 ** (-5 + (t % 6) / 2):.1e}"), Param("method", ("full", "lora", "last_layer")[t % 3])]
        for start in range(0, points, _BATCH_LIMIT):
            client.log_batch(run_id, metrics=curve[start : start + _BATCH_LIMIT], params=params if start == 0 else [])
        client.set_terminated(run_id)
        children.append(run_id)
    client.set_terminated(parent)
    return experiment, children, time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(uri: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1 in its own process group; returns it once /health answers."""
    import requests

    port = _free_port()
    log = open(tmp / "server.log", "w")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", uri, "--default-artifact-root", (tmp / "artifacts").as_uri(), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{(tmp / 'server.log').read_text()[-3000:]}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not answer on {base} within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server this script started: its own process group (gunicorn/uvicorn workers included), nothing else."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def bench_ui(base: str, experiment: str, children: list[str], trials: int, points: int) -> list[dict]:
    """Median latency of each request over ``_UI_REPEATS`` calls after a warm-up call; checks what comes back."""
    import requests

    session = requests.Session()  # keep-alive, as a browser does
    bulk = "&".join(f"run_ids={r}" for r in children[:10])
    requests_ = {
        "POST /api/2.0/mlflow/runs/search (max_results 100)": lambda: session.post(
            f"{base}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment], "max_results": 100}),
        "GET /api/2.0/mlflow/metrics/get-history (1 run)": lambda: session.get(
            f"{base}/api/2.0/mlflow/metrics/get-history", params={"run_id": children[0], "metric_key": "train_loss"}),
        "GET /ajax-api/2.0/mlflow/metrics/get-history-bulk-interval (10 runs)": lambda: session.get(
            f"{base}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval?{bulk}&metric_key=train_loss&max_results=320"),
        "GET / (the UI's index page)": lambda: session.get(f"{base}/"),
    }
    expected = {0: min(100, trials + 1), 1: points}
    rows = []
    for i, (name, call) in enumerate(requests_.items()):
        _check(name, call(), expected.get(i))  # warm-up: the first call pays the server's lazy imports
        times, size = [], 0
        for _ in range(_UI_REPEATS):
            t0 = time.perf_counter()
            resp = call()
            times.append(time.perf_counter() - t0)
            size = len(resp.content)
        rows.append({"request": name, "median_ms": statistics.median(times) * 1000, "kb": size / 1024, "ms": times})
    return rows


def _check(name: str, resp, expected: int | None) -> None:
    resp.raise_for_status()
    if expected is None:
        return
    body = resp.json()
    got = len(body.get("runs", body.get("metrics", [])))
    if got != expected:
        raise RuntimeError(f"{name}: {got} items returned, expected {expected}")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=2000, help="metric points logged per rep and way")
    p.add_argument("--reps", type=int, default=3, help="interleaved reps of the logging comparison")
    p.add_argument("--trials", type=int, default=100, help="child runs of the synthetic sweep")
    p.add_argument("--points-per-trial", type=int, default=200, help="train_loss points per child run")
    p.add_argument("--quick", action="store_true", help="500 points, 1 rep, 10 trials x 50 points (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.points, args.reps, args.trials, args.points_per_trial = 500, 1, 10, 50
    if args.points < len(_KEYS) or args.reps < 1 or args.trials < 10 or args.points_per_trial < 1:
        p.error(f"need --points >= {len(_KEYS)}, --reps >= 1, --trials >= 10, --points-per-trial >= 1")
    return args


def _cpu_model() -> str:
    from scripts.bench._common import cpu_model

    return cpu_model()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    import mlflow

    with tempfile.TemporaryDirectory(prefix="bench-mlflow-") as tmp_name:
        tmp = Path(tmp_name)
        logging_rows = bench_logging(tmp, args.points, args.reps)
        uri = f"sqlite:///{tmp / 'sweep.db'}"
        experiment, children, build_s = build_sweep(uri, args.trials, args.points_per_trial)
        proc, base = start_server(uri, tmp)
        try:
            ui_rows = bench_ui(base, experiment, children, args.trials, args.points_per_trial)
        finally:
            stop_server(proc)
        db_mb = (tmp / "sweep.db").stat().st_size / 2**20
    print(f"command: python scripts/bench/mlflow_store.py {shlex.join(argv)}".rstrip())
    print(f"mlflow {mlflow.__version__}, SQLite {sqlite3.sqlite_version}, Python {platform.python_version()}; "
          f"CPU {_cpu_model()}, {os.cpu_count()} cores")
    print(f"\nLogging {args.points} points (5 keys) per rep into a fresh SQLite store, interleaved, median of {args.reps}:\n")
    print(HEADER_LOG)
    print("|---|---|---|---|")
    for r in logging_rows:
        print(f"| {r['call']} | {r['calls_per_1000']:g} | {r['ms_per_1000']:.0f} | {r['vs_batch']:.1f} |")
    print(f"\nSynthetic sweep: 1 parent + {args.trials} child runs x {args.points_per_trial} train_loss points "
          f"(built in {build_s:.1f} s with log_batch; store {db_mb:.1f} MB), mlflow server --workers 1, "
          f"median of {_UI_REPEATS} after a warm-up call:\n")
    print(HEADER_UI)
    print("|---|---|---|")
    for r in ui_rows:
        print(f"| {r['request']} | {r['median_ms']:.1f} | {r['kb']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
