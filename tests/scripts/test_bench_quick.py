"""The benchmark scripts still run: each one's --quick smoke run exits 0 and prints its table (no timing asserts)."""
from __future__ import annotations

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # each spawns real training or an MLflow server: about a minute


def _ok(proc) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_trainer_throughput_quick_prints_the_comparison_for_every_method(tiny_model_dir):
    out = _ok(run_cli(["scripts/bench/trainer_throughput.py", "--quick"], timeout=400))
    assert "| method | ours tok/s | HF tok/s | ratio | ours peak MB | HF peak MB |" in out
    for method in ("full", "lora", "last_layer"):
        assert f"\n| {method} | " in out, method


def test_bench_trainer_wrapper_runs_the_same_benchmark(tiny_model_dir):
    out = _ok(run_cli(["scripts/bench_trainer.py", "--quick", "--methods", "lora"], timeout=300))
    assert "| method | ours tok/s | HF tok/s | ratio |" in out and "\n| lora | " in out


def test_mlflow_store_quick_prints_the_logging_and_ui_tables():
    out = _ok(run_cli(["scripts/bench/mlflow_store.py", "--quick"], timeout=300))
    assert "| call | calls per 1,000 points | ms per 1,000 points | x log_batch |" in out
    assert "| request (UI experiment page) | median ms | response KB |" in out
    for row in ("| log_batch |", "| log_metric |", "runs/search", "get-history", "index page"):
        assert row in out, row
