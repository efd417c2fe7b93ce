"""trainer_throughput and mlflow_store --quick: every figure finite, positive and consistent with the others; the
throughput ratio is the printed rates' and says parity only with repeats (no timing asserts)."""
from __future__ import annotations

import pytest

from tests.conftest import number, run_cli, table

pytestmark = pytest.mark.slow  # each spawns real training or an MLflow server: under a minute

THROUGHPUT = "| method | ours tok/s | HF tok/s | ratio | verdict |"


def _ok(proc) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert "\ncommit: " in proc.stdout and "\nmachine: " in proc.stdout
    return proc.stdout


def _check_throughput(out: str, methods: list[str]) -> None:
    """--quick: the tiny model, 4 steps of batch 4 at seq_len 48, 1 rep."""
    rows = table(out, THROUGHPUT)
    assert [r["method"] for r in rows] == methods
    for r in rows:
        rate = {}
        for impl in ("ours", "HF"):
            rate[impl], s_step, peak = number(r[f"{impl} tok/s"]), number(r[f"{impl} s/step"]), number(r[f"{impl} peak MB"])
            assert 4 <= rate[impl] * s_step * 1.01 and rate[impl] * s_step <= 4 * 48 * 1.01, r  # the tokens of one step
            assert 0 < s_step < 60 and 100 < peak < 16_000, r
        assert number(r["ratio"]) == pytest.approx(rate["ours"] / rate["HF"], rel=0.02, abs=0.006), r
        assert r["verdict"] == "n/a (1 rep)", r  # no spread from one rep: neither parity nor a win


def test_trainer_throughput_quick_prints_the_comparison_for_every_method(tiny_model_dir):
    out = _ok(run_cli(["scripts/bench/trainer_throughput.py", "--quick"], timeout=400))
    _check_throughput(out, ["full", "lora", "last_layer"])


def test_mlflow_store_quick_prints_the_logging_and_ui_tables():
    out = _ok(run_cli(["scripts/bench/mlflow_store.py", "--quick"], timeout=300))
    log = {r["call"]: r for r in table(out, "| call | calls per 1,000 points | ms per 1,000 points | x log_batch |")}
    assert list(log) == ["log_batch", "log_metric"]
    assert number(log["log_batch"]["calls per 1,000 points"]) == 1 and number(log["log_metric"]["calls per 1,000 points"]) == 1000
    batch_ms, metric_ms = number(log["log_batch"]["ms per 1,000 points"]), number(log["log_metric"]["ms per 1,000 points"])
    assert 0 < batch_ms < metric_ms < 600_000, log
    assert number(log["log_batch"]["x log_batch"]) == 1
    assert number(log["log_metric"]["x log_batch"]) == pytest.approx(metric_ms / batch_ms, rel=0.05 + 1 / batch_ms), log
    ui = {r["request (UI experiment page)"].split(" (")[0]: r for r in table(out, "| request (UI experiment page) |")}
    assert list(ui) == ["POST /api/2.0/mlflow/runs/search", "GET /api/2.0/mlflow/metrics/get-history",
                        "GET /ajax-api/2.0/mlflow/metrics/get-history-bulk-interval", "GET /"]
    for name, r in ui.items():
        assert 0 < number(r["median ms"]) < 30_000 and 0 < number(r["response KB"]) < 10_000, (name, r)
    assert number(ui["GET /api/2.0/mlflow/metrics/get-history"]["response KB"]) < number(
        ui["GET /ajax-api/2.0/mlflow/metrics/get-history-bulk-interval"]["response KB"]), "10 runs' history is more than 1's"
