"""The two question specs (prompt_loss.yaml, one_example.yaml): they load and plan as written for SmolLM2, and run
end to end on the tiny model, cut down, with their findings.

    python -m pytest -q tests/sweeps/test_question_specs.py
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, run_cli

PROMPT_LOSS, ONE_EXAMPLE = ROOT / "search_spaces" / "prompt_loss.yaml", ROOT / "search_spaces" / "one_example.yaml"


def test_both_specs_plan_their_grids_as_written():
    proc = run_cli(["sweeps/run.py", str(PROMPT_LOSS), "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert "grid, 12 trial(s), model smollm2-135m" in proc.stdout and "8 eval records, 8 training records" in proc.stdout
    assert "warning" not in proc.stdout
    proc = run_cli(["sweeps/run.py", str(ONE_EXAMPLE), "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert "grid, 9 trial(s), model smollm2-135m" in proc.stdout and "1 eval records, 1 training records" in proc.stdout
    assert "warning: only 1 held-out record(s)" in proc.stdout


def _run(spec, tmp_path, *overrides: str) -> tuple[str, list[dict]]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["sweeps/run.py", str(spec), "model=tiny", f"output_dir={tmp_path / 'out'}", *overrides], timeout=900,
                   env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = next(line.split(":")[0].removeprefix("sweep ") for line in proc.stdout.splitlines() if line.startswith("sweep "))
    return proc.stdout, json.loads((tmp_path / "out" / name / "trials.json").read_text())


@pytest.mark.slow
def test_one_example_logs_the_exact_match_curve_and_says_the_epochs_it_took(tmp_path, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    out, trials = _run(ONE_EXAMPLE, tmp_path, "space.method=[full]", "train.epochs=6")
    assert len(trials) == 3
    for t in trials:  # one point an epoch, in trials.json and in MLflow, beside the forgetting measured with it
        assert [h["examples_seen"] for h in t["history"] if "train_exact_match" in h] == [1, 2, 3, 4, 5, 6]
        assert all(h.get("forgetting") is not None for h in t["history"] if "train_exact_match" in h)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("one-example")
    child = next(r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags)
    assert [m.step for m in client.get_metric_history(child.info.run_id, "train_exact_match")] == [1, 2, 3, 4, 5, 6]
    findings = out.split("findings:")[1]
    assert "  - warning: the held-out set has 1 record(s)" in findings
    assert "  - fewest epochs until the training completion came back exactly, per method: " in findings
    assert sum(line.startswith("  - full, lr ") for line in findings.splitlines()) == 3


@pytest.mark.slow
def test_prompt_loss_says_what_each_weight_did_and_the_prompts_share_of_the_loss(tmp_path, tiny_model_dir):
    out, trials = _run(PROMPT_LOSS, tmp_path, "space.method=[lora]", "space.prompt_loss_weight=[0.0, 1.0]")
    assert sorted((t["config"]["prompt_loss_weight"], t["config"]["learning_rate"]) for t in trials) == [
        (0.0, 0.0032), (0.0, 0.01), (1.0, 0.0032), (1.0, 0.01)]
    assert all(t["final"]["prompt_tokens"] > 10 * t["final"]["completion_tokens"] for t in trials)
    findings = out.split("findings:")[1]
    assert "  - which tokens carry the loss: " in findings and "the prompt's share of it is 0: 0%, 1: 9" in findings
    rows = [line for line in findings.splitlines() if line.startswith("  - lora, lr ")]
    assert len(rows) == 2 and all("weight 0: " in r and "; weight 1: " in r for r in rows)
    assert "  - lora: from prompt_loss_weight 0 to 1: lr 3.2e-3: " in findings
