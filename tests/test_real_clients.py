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

from tests.conftest import ray_node, run_cli, stop_ray_nodes_under
from tests.test_faults import _children, _free_port, _mlflow_server

pytestmark = pytest.mark.slow


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
        yield uri, out, proc.stdout
    finally:
        os.killpg(server.pid, signal.SIGKILL)


def _printed_link(stdout: str, words: str) -> str:
    """The URL printed on the line after ``words`` at the end of a sweep."""
    lines = stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if words in line)
    return lines[i + 1].strip()


def test_the_parent_run_explains_itself_note_findings_and_summary_metrics(served_smoke_sweep):
    uri, out, stdout = served_smoke_sweep
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("smoke")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("role") == "sweep")
    note = parent.data.tags["mlflow.note.content"]
    findings = (out / "smoke" / "report" / "report.html").read_text()
    printed = [line[4:] for line in stdout.split("findings:")[1].splitlines() if line.startswith("  - ")]
    assert printed and all(f"- {f}" in note for f in printed), "every finding is in the run's note"
    assert "map.png" in note and "report.html" in note and "#/compare-runs?" in note
    assert "Best:" in note and findings
    metrics = parent.data.metrics
    assert metrics["trials"] == 4 and "best_eval_loss" in metrics
    assert sum(v for k, v in metrics.items() if k.startswith("trials_")) == 4
    assert parent.info.status == "FINISHED"


@pytest.fixture
def browser(request) -> str:
    """Debian's headless Chromium; the test skips, saying why, without it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    print(f"SKIP REASON: Debian's chromium is not installed (apt-get install chromium); {request.node.name} did not run")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def test_mlflow_ui_shows_the_sweep_in_a_real_browser(served_smoke_sweep, browser, tmp_path):
    uri, _, stdout = served_smoke_sweep
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
    # the printed links: every trial's train-loss curve in one chart, and parallel coordinates against eval loss
    curves_url, compare_url = _printed_link(stdout, "overlaid:"), _printed_link(stdout, "parallel coordinates")
    dom = subprocess.run([browser, *flags, "--dump-dom", curves_url], capture_output=True, text=True, timeout=120).stdout
    assert len(set(re.findall(r">([^<>]+) \(train_loss\)<", dom))) == 4, "one train_loss curve per trial in the legend"
    dom = subprocess.run([browser, *flags, "--dump-dom", compare_url], capture_output=True, text=True, timeout=120).stdout
    assert "Parallel Coordinates Plot" in dom and "learning_rate" in dom and "eval_loss" in dom
    shots = {"ui_runs.png": exp_url, "ui_map_artifact.png": run_url, "ui_curves.png": curves_url, "ui_compare.png": compare_url}
    for name, url in shots.items():
        subprocess.run([browser, *flags, f"--screenshot={tmp_path / name}", url], capture_output=True, timeout=120)
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 10_000, name
        if os.environ.get("SAVE_UI_SCREENSHOTS"):  # how the screenshots in mlflow/ were made
            shutil.copy(tmp_path / name, Path(os.environ["SAVE_UI_SCREENSHOTS"]) / name)


def test_optuna_dashboard_serves_the_study_with_history_and_importance(served_smoke_sweep, browser, tmp_path):
    _, out, _ = served_smoke_sweep
    port = _free_port()
    dash = subprocess.Popen(["bash", "scripts/dashboard", str(out / "smoke")], cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "PORT": str(port), "PYTHON": sys.executable}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import urllib.request

        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as resp:
                    assert b'"study_name": "smoke"' in resp.read()
                break
            except OSError:
                import time

                time.sleep(1)
        else:
            pytest.fail("optuna-dashboard did not answer on 127.0.0.1 within 60 s")
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
                 "--window-size=1400,1000"]
        url = f"http://127.0.0.1:{port}/dashboard/studies/1"
        dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        assert "History" in dom and "Hyperparameter Importance" in dom
    finally:
        os.killpg(dash.pid, signal.SIGKILL)


def test_the_dashboard_command_refuses_a_folder_without_a_study_with_exit_2(tmp_path):
    proc = subprocess.run(["bash", "scripts/dashboard", str(tmp_path)], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "no Optuna study there" in proc.stderr


def test_smoke_sweep_runs_on_a_two_node_ray_cluster_with_an_mlflow_server(tmp_path, tiny_model_dir):
    temp_dir = Path(f"/tmp/ray-ft-{os.getpid()}")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    port = _free_port()
    store = tmp_path / "store"
    store.mkdir()
    server = _mlflow_server(store, _free_port())
    uri = f"http://127.0.0.1:{server.args[server.args.index('--port') + 1]}"
    try:
        ray_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false"], temp_dir, env)
        ray_node([f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1"], temp_dir, env)
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
        stop_ray_nodes_under(temp_dir)
        os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
