"""The diagnosis tells the truth on real sweeps (Ray Tune + Optuna + MLflow + torch on the tiny model).

- Train on one topic (cooking), evaluate on another (astronomy): the training loss falls while the
  held-out loss rises. That is overfitting or a train/eval mismatch, never divergence.
- A user's own training file with no eval data is evaluated on a held-out share of itself, said at start,
  never on the built-in facts.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[1] / "data"


def test_two_domains_train_loss_falls_held_out_rises_is_overfit_not_diverged(tmp_path, tiny_model_dir):
    spec = tmp_path / "two_domains.yaml"
    spec.write_text(f"""name: two-domains
model: tiny
data: {{train: "{DATA / 'cooking_train.jsonl'}", eval: "{DATA / 'astronomy_eval.jsonl'}"}}
train: {{epochs: 8, batch_size: 4, seq_len: 48, report_every: 4, eval_every: 32, memorization: false,
        forgetting: false, weight_change: false, method: full}}
search: {{algorithm: grid}}
space:
  learning_rate: [0.003, 0.01, 0.03]
pruning: {{rule: none}}
output_dir: {tmp_path / 'out'}
""")
    proc = run_cli(["sweeps/run.py", str(spec)], timeout=600, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = json.loads((tmp_path / "out/two-domains/trials.json").read_text())
    assert len(trials) == 3
    for t in trials:
        losses = [h["train_loss"] for h in t["history"] if h.get("train_loss") is not None]
        if losses[-1] < losses[0]:  # its training loss fell: whatever the held-out loss did, it did not diverge
            assert t["outcome"] != "diverged", (t["config"]["learning_rate"], t["evidence"])
    overfit = [t for t in trials if t["outcome"] == "overfit"]
    assert overfit, [(t["config"]["learning_rate"], t["outcome"], t["evidence"]) for t in trials]
    for t in overfit:
        evals = [h["eval_loss"] for h in t["history"] if h.get("eval_loss") is not None]
        assert evals[-1] > min(evals), "an overfit trial's held-out loss ended above its minimum"
    findings = proc.stdout.split("findings:")[1]
    assert "overfitting or a train/eval mismatch, not divergence" in findings
    assert "diverged at" not in findings
    html = (tmp_path / "out/two-domains/report/report.html").read_text()
    assert "overfit / mismatch" in html


def test_a_users_training_file_without_eval_data_is_evaluated_on_a_held_out_share_of_itself(tmp_path, tiny_model_dir):
    spec = tmp_path / "own.yaml"
    spec.write_text(f"""name: own-data
model: tiny
data: {{train: "{DATA / 'cooking_train.jsonl'}"}}
train: {{epochs: 1, batch_size: 4, seq_len: 48, report_every: 4, eval_every: null, memorization: true,
        forgetting: false, weight_change: false, method: lora, learning_rate: 0.01}}
search: {{algorithm: grid}}
space: {{batch_size: [4]}}
output_dir: {tmp_path / 'out'}
""")
    dry = run_cli(["sweeps/run.py", str(spec), "--dry-run"])
    assert dry.returncode == 0 and "10% of" in dry.stdout and "held out" in dry.stdout, dry.stdout + dry.stderr
    small = "warning: only 2 held-out record(s) (fewer than 8)"  # 10% of 24: said before anything runs, and after
    assert "2 eval records, 22 training records" in dry.stdout and small in dry.stdout
    proc = run_cli(["sweeps/run.py", str(spec)], timeout=600, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cooking_train.jsonl held out" in proc.stdout and "2 eval records, 22 training records" in proc.stdout
    assert small in proc.stdout.split("findings:")[0]
    assert "  - warning: the held-out set has 2 record(s), fewer than 8" in proc.stdout.split("findings:")[1]
    (trial,) = json.loads((tmp_path / "out/own-data/trials.json").read_text())
    assert trial["config"]["eval_data"] is None and trial["config"]["eval_fraction"] == pytest.approx(0.1)
    assert "builtin" not in json.dumps(trial["config"])
    # 22 training examples, one epoch at batch 4: 6 steps, and the held-out 2 were never trained on
    assert trial["history"][-1]["step"] == 6
