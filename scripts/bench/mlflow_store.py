"""Scale of the MLflow store (BENCHMARKS.md section 6): ``log_batch`` against ``log_metric``, and the UI's experiment page
on a synthetic sweep served by ``mlflow server``."""
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: this checkout's packages

import requests
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from scripts.bench._harness import cli, entry, fmt, spread, stop_session, timed

KEYS = ("train_loss", "train_loss_ema", "eval_loss", "grad_norm", "lr")  # what a trial reports
LIMIT = 1000  # metrics per log_batch call (the REST limit)
UI_REPEATS = 5


def bench_logging(client, n: int, reps: int) -> dict[str, list[float]]:
    """Seconds for ``n`` points, log_batch and log_metric interleaved, each rep into a fresh run."""
    experiment = client.create_experiment("logging-cost")  # the schema exists before anything is timed
    ways = {"log_batch": lambda run, pts: [client.log_batch(run, metrics=pts[i: i + LIMIT]) for i in range(0, len(pts), LIMIT)],
            "log_metric": lambda run, pts: [client.log_metric(run, m.key, m.value, m.timestamp, m.step) for m in pts]}
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(reps):
        for way, log in ways.items():
            run = client.create_run(experiment, run_name=way).info.run_id
            now = int(time.time() * 1000)
            points = [Metric(KEYS[i % len(KEYS)], 1.0 / (1 + i), now + i, i // len(KEYS)) for i in range(n)]
            seconds[way].append(timed(log, run, points)[1])
            if len(client.get_metric_history(run, KEYS[0])) != len(range(0, n, len(KEYS))):
                raise RuntimeError(f"{way}: not every point was stored")
    return seconds


def build_sweep(client, trials: int, points: int) -> tuple[str, list[str]]:
    """One parent run and ``trials`` child runs with ``points`` train_loss points each."""
    experiment = client.create_experiment("synthetic-sweep")
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    children = []
    for t in range(trials):
        run = client.create_run(experiment, run_name=f"trial {t}", tags={"mlflow.parentRunId": parent}).info.run_id
        now = int(time.time() * 1000)
        curve = [Metric("train_loss", 3.0 / (1 + 0.05 * s) + 0.01 * (t % 7), now + s, s) for s in range(points)]
        for i in range(0, points, LIMIT):
            params = [] if i else [Param("learning_rate", f"{10 ** (-5 + t % 6 / 2):.1e}")]
            client.log_batch(run, metrics=curve[i: i + LIMIT], params=params)
        client.set_terminated(run)
        children.append(run)
    return experiment, children


def serve(uri: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow server --workers 1`` on 127.0.0.1, in its own process group; returned once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers",
                             "1", "--backend-store-uri", uri, "--default-artifact-root", (tmp / "artifacts").as_uri()],
                            cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except requests.ConnectionError:
            time.sleep(0.5)
    stop_session(proc.pid)
    raise RuntimeError(f"mlflow server did not answer on {base}")


def bench_ui(base: str, experiment: str, children: list[str], trials: int, points: int) -> list[dict]:
    """Median latency of the experiment page's REST calls, after a warm-up call that also checks what comes back."""
    session = requests.Session()
    bulk, api = "&".join(f"run_ids={r}" for r in children[:10]), f"{base}/api/2.0/mlflow"
    calls = {
        "POST /api/2.0/mlflow/runs/search (max_results 100)": (lambda: session.post(
            f"{api}/runs/search", json={"experiment_ids": [experiment], "max_results": 100}), min(100, trials + 1)),
        "GET /api/2.0/mlflow/metrics/get-history (1 run)": (lambda: session.get(
            f"{api}/metrics/get-history", params={"run_id": children[0], "metric_key": "train_loss"}), points),
        "GET /ajax-api/2.0/mlflow/metrics/get-history-bulk-interval (10 runs)": (lambda: session.get(
            f"{base}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval?{bulk}&metric_key=train_loss&max_results=320"), None),
        "GET / (the UI's index page)": (lambda: session.get(f"{base}/"), None)}
    rows = []
    for name, (call, expected) in calls.items():
        resp = call()
        resp.raise_for_status()
        if expected is not None and len((body := resp.json()).get("runs", body.get("metrics", []))) != expected:
            raise RuntimeError(f"{name}: not the {expected} items expected")
        timings = [timed(call) for _ in range(UI_REPEATS)]
        rows.append({"request": name, "ms": [1000 * s for _, s in timings], "kb": len(timings[-1][0].content) / 1024})
    return rows


def main(argv: list[str] | None = None) -> None:
    args, rep = cli(__doc__, __file__, argv, dict(points=500, reps=1, trials=10, points_per_trial=50), points=2000,
                    reps=3, trials=100, points_per_trial=200)
    with tempfile.TemporaryDirectory(prefix="bench-mlflow-") as tmp_name:
        tmp = Path(tmp_name)
        seconds = bench_logging(MlflowClient(f"sqlite:///{tmp / 'logging.db'}"), args.points, args.reps)
        uri = f"sqlite:///{tmp / 'sweep.db'}"
        (experiment, children), build_s = timed(build_sweep, MlflowClient(uri), args.trials, args.points_per_trial)
        db_mb = (tmp / "sweep.db").stat().st_size / 2**20
        proc, base = serve(uri, tmp)
        try:
            ui = bench_ui(base, experiment, children, args.trials, args.points_per_trial)
        finally:
            stop_session(proc.pid)  # the server's own session: its workers, nothing else
            proc.wait(timeout=30)
    per_1000 = {w: [1e6 * s / args.points for s in v] for w, v in seconds.items()}
    batch = statistics.median(per_1000["log_batch"])
    rep.table(["call", "calls per 1,000 points", "ms per 1,000 points", "x log_batch"],
              [[w, 1 if w == "log_batch" else "1,000", spread(v, 0), f"{statistics.median(v) / batch:.1f}"]
               for w, v in per_1000.items()], f"Logging {args.points} points (5 keys) per rep into a fresh SQLite store, "
              f"interleaved, median (min-max) of {args.reps}:")
    rep.table(["request (UI experiment page)", "median ms", "response KB"],
              [[r["request"], spread(r["ms"]), fmt(r["kb"])] for r in ui],
              f"Synthetic sweep: 1 parent + {args.trials} child runs x {args.points_per_trial} points (built in {build_s:.1f} s, "
              f"{db_mb:.1f} MB), mlflow server --workers 1, median (min-max) of {UI_REPEATS} after a warm-up call:")
    rep.save({"logging_s": seconds, "ui": ui})


if __name__ == "__main__":
    entry(main, globals())
