"""Real clients: the MLflow UI in headless Chromium, and a real 2-node Ray cluster with an MLflow server.

The browser test skips, printing why, when Debian's chromium is not installed.
The cluster test starts its own `ray start` head and worker on 127.0.0.1 in a
private temp dir and stops exactly those processes afterwards.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_faults import _children, _free_port, _mlflow_server

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def served_smoke_sweep(tmp_path_factory, tiny_model_dir):
    """A finished smoke sweep tracked by a real `mlflow server` on 127.0.0.1."""
    store = tmp_path_factory.mktemp("mlflow_store")
    port = _free_port()
    server = _mlflow_server(store, port)
    uri = f"http://127.0.0.1:{port}"
    out = tmp_path_factory.mktemp("sweeps")
    try:
        proc = run_cli(["sweeps/run.py", "search_spaces/smoke.yaml", f"output_dir={out}"], timeout=600,
                       env={"MLFLOW_TRACKING_URI": uri})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield uri, out
    finally:
        os.killpg(server.pid, signal.SIGKILL)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_mlflow_ui_shows_the_sweep_in_a_real_browser(served_smoke_sweep, tmp_path):
    browser = _chromium()
    if browser is None:
        print("SKIP REASON: Debian's chromium is not installed (apt-get install chromium); the MLflow UI browser test did not run")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    uri, _ = served_smoke_sweep
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("role") == "sweep")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--window-size=1400,900"]
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development", "the UI opens on the runs table"
    exp_url = f"{uri}/#/experiments/{exp.experiment_id}/runs"
    dom = subprocess.run([browser, *flags, "--dump-dom", exp_url], capture_output=True, text=True, timeout=120).stdout
    assert "sweep smoke" in dom, "the parent run is listed on the experiment page"
    # the 4 trial runs are nested under the parent: the table counts them (1 parent + 4 trials)
    assert re.search(r"<strong>5</strong>\s*matching runs", dom), "the trial runs are listed"
    run_url = f"{uri}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts/report/map.png"
    dom = subprocess.run([browser, *flags, "--dump-dom", run_url], capture_output=True, text=True, timeout=120).stdout
    # the artifact view names the file it shows and lists the folder's other files, as read from the server
    assert "report/map.png" in dom and "curves.png" in dom, "the map artifact is on the parent run"
    shots = {"ui_runs.png": exp_url, "ui_map_artifact.png": run_url}
    for name, url in shots.items():
        subprocess.run([browser, *flags, f"--screenshot={tmp_path / name}", url], capture_output=True, timeout=120)
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 10_000, name
        if os.environ.get("SAVE_UI_SCREENSHOTS"):  # how the screenshots in mlflow/ were made
            shutil.copy(tmp_path / name, Path(os.environ["SAVE_UI_SCREENSHOTS"]) / name)


def _ray_node(args: list[str], temp_dir: Path, env: dict) -> None:
    proc = subprocess.run([RAY, "start", *args, "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _stop_nodes_under(temp_dir: Path) -> None:
    """Kill only the Ray processes of this test's cluster (their command lines name its temp dir)."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(temp_dir) in cmdline:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_smoke_sweep_runs_on_a_two_node_ray_cluster_with_an_mlflow_server(tmp_path, tiny_model_dir):
    temp_dir = Path(f"/tmp/ray-ft-{os.getpid()}")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    port = _free_port()
    store = tmp_path / "store"
    store.mkdir()
    server = _mlflow_server(store, _free_port())
    uri = f"http://127.0.0.1:{server.args[server.args.index('--port') + 1]}"
    try:
        _ray_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false"], temp_dir, env)
        _ray_node([f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1"], temp_dir, env)
        proc = run_cli(["sweeps/run.py", "search_spaces/smoke.yaml", f"output_dir={tmp_path / 'out'}",
                        "--address", f"127.0.0.1:{port}"], timeout=600,
                       env={"RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": uri})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        trials = json.loads((tmp_path / "out" / "smoke" / "trials.json").read_text())
        nodes = {t["final"].get("node_id") for t in trials}
        assert len(trials) == 4 and len(nodes - {None}) == 2, f"trials ran on {nodes}"
        _, children = _children(uri, "smoke")
        assert len(children) == 4 and all(c.info.status != "RUNNING" for c in children)
    finally:
        _stop_nodes_under(temp_dir)
        os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
