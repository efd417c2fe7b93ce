"""The pruning-savings benchmark still runs: its --quick smoke run exits 0 and prints every table (no timing asserts)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # two real sweeps (Ray, Optuna, MLflow, torch) on the tiny model: a minute or two


def test_pruning_savings_quick_prints_steps_best_latency_and_trials(tiny_model_dir, tmp_path):
    out_json = tmp_path / "pruning.json"
    proc = run_cli(["scripts/bench/pruning_savings.py", "--quick", "--json", str(out_json)], timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    out = proc.stdout
    assert "| | with pruning | without pruning | saved |" in out
    assert "| optimizer steps (3 matched trials) | " in out
    assert "| run | method | learning_rate | batch_size | objective (eval_loss, min) | outcome |" in out
    assert "| with pruning | " in out and "| without pruning | " in out
    assert "| method | lr | bs | past threshold at report # (examples) | stopped at report # (examples) |" in out
    assert "| method | lr | bs | steps with pruning | steps without | outcome with pruning | outcome without |" in out
    for lr in ("0.001", "0.03", "3"):  # every cell of the quick grid, side by side
        assert f"\n| full | {lr} | 4 | " in out, lr
    figures = json.loads(out_json.read_text())
    assert figures["matched"] == 3 and figures["steps_unpruned"] > 0
    assert {row["learning_rate"] for row in figures["trials"]} == {0.001, 0.03, 3.0}
