"""The benchmark scripts still run: each one's --quick smoke run exits 0 and prints its table with sane numbers
(finite, positive, consistent with each other; no timing asserts beyond what the quick run must give)."""
from __future__ import annotations

import pytest

from tests.conftest import number, run_cli, table

pytestmark = pytest.mark.slow  # each spawns real training or an MLflow server: about a minute

THROUGHPUT = "| method | ours tok/s | HF tok/s | ratio | ours peak MB | HF peak MB | ours s/step | HF s/step |"


def _ok(proc) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc.stdout


def _check_throughput(out: str, methods: list[str]) -> None:
    """One row per method; --quick trains the tiny model 4 steps of batch 4, seq_len 48, on the CPU."""
    rows = table(out, THROUGHPUT)
    assert [r["method"] for r in rows] == methods
    for r in rows:
        rate = {}
        for impl in ("ours", "HF"):
            rate[impl], s_step, peak = number(r[f"{impl} tok/s"]), number(r[f"{impl} s/step"]), number(r[f"{impl} peak MB"])
            assert 10 <= rate[impl] <= 1e6 and 0 < s_step < 60, r  # 85 to 820 tok/s, 0.1 to 1 s a step on 2 shared CPUs
            # tok/s x s/step is the tokens of one step: 4 examples of 1 to 48 tokens (s/step is printed to 0.01 s)
            assert rate[impl] * (s_step - 0.005) <= 4 * 48 and rate[impl] * (s_step + 0.005) >= 4, r
            assert 100 < peak < 16_000, r  # a process with torch and the tiny model: 550 to 650 MB
        assert number(r["ratio"]) == pytest.approx(rate["ours"] / rate["HF"], rel=0.02, abs=0.006), r


def test_trainer_throughput_quick_prints_the_comparison_for_every_method(tiny_model_dir):
    out = _ok(run_cli(["scripts/bench/trainer_throughput.py", "--quick"], timeout=400))
    _check_throughput(out, ["full", "lora", "last_layer"])


def test_bench_trainer_wrapper_runs_the_same_benchmark(tiny_model_dir):
    out = _ok(run_cli(["scripts/bench_trainer.py", "--quick", "--methods", "lora"], timeout=300))
    _check_throughput(out, ["lora"])


def test_mlflow_store_quick_prints_the_logging_and_ui_tables():
    out = _ok(run_cli(["scripts/bench/mlflow_store.py", "--quick"], timeout=300))
    log = {r["call"]: r for r in table(out, "| call | calls per 1,000 points | ms per 1,000 points | x log_batch |")}
    assert list(log) == ["log_batch", "log_metric"]
    assert number(log["log_batch"]["calls per 1,000 points"]) == 1 and number(log["log_metric"]["calls per 1,000 points"]) == 1000
    batch_ms, metric_ms = number(log["log_batch"]["ms per 1,000 points"]), number(log["log_metric"]["ms per 1,000 points"])
    assert 0 < batch_ms < metric_ms < 600_000, log  # 60 and 2,400 ms into SQLite on 2 shared CPUs: one call against 1,000
    assert number(log["log_batch"]["x log_batch"]) == 1
    assert number(log["log_metric"]["x log_batch"]) == pytest.approx(metric_ms / batch_ms, rel=0.01 + 0.5 / batch_ms), log
    ui = {r["request (UI experiment page)"].split(" (")[0]: r for r in table(out, "| request (UI experiment page) |")}
    assert list(ui) == ["POST /api/2.0/mlflow/runs/search", "GET /api/2.0/mlflow/metrics/get-history",
                        "GET /ajax-api/2.0/mlflow/metrics/get-history-bulk-interval", "GET /"]
    for name, r in ui.items():
        assert 0 < number(r["median ms"]) < 30_000 and 0 < number(r["response KB"]) < 10_000, (name, r)
    one = number(ui["GET /api/2.0/mlflow/metrics/get-history"]["response KB"])
    ten = number(ui["GET /ajax-api/2.0/mlflow/metrics/get-history-bulk-interval"]["response KB"])
    assert one < ten, "the history of 10 runs is more than that of 1"
