"""A method of one's own, added in one file (``tests/toy_method.py``) and run through a real sweep.

Nothing else in the project is edited for it: ``$FINETUNE_SWEEPS_METHODS`` names the module, the driver imports it
before the spec is validated and passes the variable to every Ray worker, which imports it before the trial's
config is validated (Ray, Optuna, MLflow and torch on the tiny model, nothing mocked).
"""
from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

# the name tests/toy_method.py registers; not imported from it: that would register the method in this process, and
# tests run after this one (the registry's order, the methods parametrized over METHODS) would see a fourth method
NAME = "norms_only"

pytestmark = pytest.mark.slow
ENV = {"FINETUNE_SWEEPS_METHODS": "tests.toy_method"}


def _spec(tmp_path):
    spec = tmp_path / "toy.yaml"
    spec.write_text(f"""name: toy
model: tiny
data: {{train: "builtin:facts:16", eval: "builtin:facts-heldout:16"}}
train: {{epochs: 1, batch_size: 4, seq_len: 48, report_every: 4, eval_every: 16, memorization: false, forgetting: false}}
search: {{algorithm: grid, max_concurrent: 2}}
space:
  method: [{NAME}]
  learning_rate: [0.01, 0.1]
pruning: {{rule: none}}
failure: {{checkpoint_every: 0}}
output_dir: {tmp_path / 'out'}
""")
    return spec


def test_a_method_not_registered_is_a_user_error_naming_the_key(tmp_path):
    proc = run_cli(["sweeps/run.py", str(_spec(tmp_path)), "--dry-run"], env={"FINETUNE_SWEEPS_METHODS": ""})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"unknown method '{NAME}'" in proc.stderr and f"space.method='{NAME}'" in proc.stderr, proc.stderr
    bad = run_cli(["sweeps/run.py", str(_spec(tmp_path)), "--dry-run"], env={"FINETUNE_SWEEPS_METHODS": "tests.no_such"})
    assert bad.returncode == 2 and "FINETUNE_SWEEPS_METHODS" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_a_method_added_in_one_file_runs_through_a_sweep(tmp_path, tiny_model_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["sweeps/run.py", str(_spec(tmp_path))], timeout=600, env={**ENV, "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep_dir = tmp_path / "out" / "toy"
    trials = json.loads((sweep_dir / "trials.json").read_text())
    assert len(trials) == 2
    for t in trials:
        assert t["config"]["method"] == NAME and t["outcome"] not in ("failed", "unfinished", "pruned"), t.get("error")
        assert t["final"].get("done") and 0 < t["final"]["trainable_fraction"] < 0.05, t["final"]
    assert f"{NAME}:" in proc.stdout, "the diagnosis has a line for the method"
    html = (sweep_dir / "report" / "report.html").read_text()
    assert NAME in html and (sweep_dir / "report" / "map.png").is_file()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("toy")
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert sorted(c.data.params["method"] for c in children) == [NAME, NAME]
