"""The memory estimate holds on real runs: --quick trains the tiny model (full, lora, last_layer, checkpointing off
and on, and batch-16 rows where the training step sets the peak) under the memory profiler, and measures one
training step of a small-vocabulary model; every row's estimate is within 25% of the measured peak of live tensor
bytes."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # eight whole training runs, each in its own process


def test_quick_estimates_are_within_a_quarter_of_the_measured_peaks(tiny_model_dir, tmp_path):
    out = tmp_path / "rows.json"
    proc = run_cli(["scripts/bench/memory_estimate.py", "--quick", "--out", str(out)], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows, block_rows = data["rows"], data["block_rows"]
    seen = {(r["method"], r["checkpointing"], r["batch"]) for r in rows}
    for method in ("full", "lora", "last_layer"):
        assert {(method, False, 8), (method, True, 8)} <= seen, method
    assert {r["estimate_phase"] for r in rows} >= {"eval", "backward start"}  # both kinds of peak are checked
    for r in rows:
        assert r["peak_bytes"] > 100 * 2**20, r  # a real run: the model's logits alone are hundreds of MiB
        assert 0.75 <= r["ratio"] <= 1.25, r
    # One training step of a small-vocabulary model: the saved activations, a block's recomputation under
    # checkpointing and the gradients set these peaks, which the 49k-vocabulary logits hide in whole runs.
    assert {(r["method"], r["checkpointing"]) for r in block_rows} == {
        (m, c) for m in ("full", "lora", "last_layer") for c in (False, True)}
    for r in block_rows:
        assert r["peak_bytes"] > 10 * 2**20 and 0.75 <= r["ratio"] <= 1.25, r
    assert "| model | method | dtype | checkpointing | batch x seq | estimate MiB | measured MiB | ratio |" in proc.stdout
