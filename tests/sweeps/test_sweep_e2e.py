"""End to end, for real: Ray Tune + Optuna + MLflow + torch on the tiny model (nothing mocked)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

# smoke.yaml's 2x2 grid on the tiny model, as it ends: no fault and LRs it survives, so every trial runs its 8 steps;
# full at 3e-2 learns (63% of l0 gained), the other three gain under 10% of l0 in that budget (1-5%): slow
SMOKE = {("full", 0.001): "slow", ("full", 0.03): "converged", ("lora", 0.001): "slow", ("lora", 0.03): "slow"}


def _runs(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("role") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("smoke")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    proc = run_cli(["sweeps/run.py", "search_spaces/smoke.yaml", f"output_dir={out}"], timeout=600,
                   env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "smoke", uri, proc.stdout


def test_smoke_sweep_records_every_trial_in_mlflow(smoke_sweep):
    sweep_dir, uri, stdout = smoke_sweep
    client, parents, children = _runs(uri, "smoke")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    for child in children:
        history = client.get_metric_history(child.info.run_id, "train_loss")
        assert len(history) >= 4, "a loss point per report"
        assert [m.step for m in history] == sorted(m.step for m in history)
    ended = {(c.data.params["method"], float(c.data.params["learning_rate"])):
             (c.data.tags["outcome"], c.data.tags["classification"], c.info.status) for c in children}
    assert ended == {cell: ("completed", outcome, "FINISHED") for cell, outcome in SMOKE.items()}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/map.png" in artifacts and "report/report.html" in artifacts
    assert parent.data.tags["spec_digest"] and parent.data.tags["git_sha"]


def test_smoke_sweep_leaves_an_optuna_study_and_a_summary(smoke_sweep):
    sweep_dir, _, stdout = smoke_sweep
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert len(study.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials), "none pruned, none failed"
    assert {t.user_attrs["method"] for t in study.trials} == {"full", "lora"}
    trials = json.loads((sweep_dir / "trials.json").read_text())
    assert {(t["config"]["method"], t["config"]["learning_rate"]): t["outcome"] for t in trials} == SMOKE
    for word in ("trial", "method", "outcome", "eval_loss", "best:"):
        assert word in stdout
    serve = re.search(r"browse: +bash (\S+) ", stdout)
    assert serve and Path(serve.group(1)).is_file(), "the printed MLflow UI command names the project's serve script"
    assert (sweep_dir / "report" / "report.html").is_file()


def _tiny_sweep(tmp_path, name: str, train: str, rest: str):
    """Run a sweep of the tiny model on 16 facts as a user would; (sweep folder, MLflow URI, stdout)."""
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(f"""name: {name}
model: tiny
data: {{train: "builtin:facts:16", eval: "builtin:facts-heldout:16"}}
train: {{batch_size: 4, seq_len: 48, report_every: 4, eval_every: 16, memorization: false, learning_rate: 0.003, {train}}}
{rest}
output_dir: {tmp_path / 'out'}
""")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["sweeps/run.py", str(spec)], timeout=600, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / "out" / name, uri, proc.stdout


def test_pruning_bridge_stops_nan_and_exploding_trials_and_tells_optuna_pruned(tmp_path, tiny_model_dir):
    _, uri, _ = _tiny_sweep(tmp_path, "faults", "epochs: 3, forgetting: false, method: full",
                            'search: {algorithm: grid}\nspace:\n  fault: [null, "nan@3", "explode@4"]\npruning: {rule: none}')
    trials = {t["config"].get("fault"): t for t in json.loads((tmp_path / "out/faults/trials.json").read_text())}
    assert trials["nan@3"]["outcome"] == "diverged" and "non-finite loss" in trials["nan@3"]["stopped_by"]
    assert trials["explode@4"]["outcome"] == "diverged" and trials["explode@4"]["stopped_by"].startswith("diverged")
    assert trials[None]["outcome"] != "diverged"
    # the explosion is caught at the first report after it (latency <= 1 report)
    assert trials["explode@4"]["history"][-1]["step"] <= 4 + 1
    study = optuna.load_study(study_name="faults", storage=f"sqlite:///{tmp_path / 'out/faults/optuna.db'}")
    states = {t.user_attrs.get("fault"): t.state for t in study.trials}
    assert states["nan@3"] == optuna.trial.TrialState.PRUNED
    assert states["explode@4"] == optuna.trial.TrialState.PRUNED
    assert states[None] == optuna.trial.TrialState.COMPLETE
    _, _, children = _runs(uri, "faults")
    reasons = {c.data.params.get("fault"): c.data.tags["reason"] for c in children}
    assert "non-finite loss" in reasons["nan@3"] and "step 3" in reasons["nan@3"]


def test_a_multi_objective_sweep_stops_a_diverging_trial_records_it_pruned_and_tags_its_front(tmp_path, tiny_model_dir):
    sweep_dir, uri, stdout = _tiny_sweep(tmp_path, "mo", "epochs: 2, forgetting: true", """\
search: {algorithm: grid, metric: [eval_loss, forgetting], mode: [min, min]}
space:
  method: [full, lora]
  fault: {values: [null, "explode@4"], when: {method: [full]}}
pruning: {rule: none}""")
    trials = {(t["config"]["method"], t["config"].get("fault")): t for t in json.loads((sweep_dir / "trials.json").read_text())}
    exploded = trials[("full", "explode@4")]
    assert exploded["outcome"] == "diverged" and exploded["stopped_by"].startswith("diverged")
    assert exploded["history"][-1]["step"] <= 4 + 1, "stopped within one report of the explosion"
    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert len(study.directions) == 2
    by_cell = {(t.user_attrs["method"], t.user_attrs.get("fault")): t for t in study.trials}
    assert by_cell[("full", "explode@4")].state == optuna.trial.TrialState.PRUNED
    for method in ("full", "lora"):
        clean, record = by_cell[(method, None)], trials[(method, None)]
        assert clean.state == optuna.trial.TrialState.COMPLETE
        assert clean.values == pytest.approx([record["final"]["eval_loss"], record["final"]["forgetting"]])
    front = {t.number for t in study.best_trials}
    _, _, children = _runs(uri, "mo")
    tags = {(c.data.params["method"], c.data.params.get("fault", "None")): c.data.tags for c in children}
    on_front = {cell for cell, t in tags.items() if t.get("pareto") == "true"}
    assert on_front == {(m, str(f)) for (m, f), t in by_cell.items() if t.number in front}, "MLflow's front is Optuna's"
    assert "pareto" not in tags[("full", "explode@4")], "a stopped trial is on no front"
    assert "trade-off front" in stdout and (sweep_dir / "report" / "tradeoff.png").is_file()
