"""The search-efficiency benchmark still runs: --quick exits 0 and prints its tables (no timing asserts)."""
from __future__ import annotations

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # two real Ray sweeps and one HF search on the tiny model: a few minutes


def test_search_efficiency_quick_prints_one_row_per_searcher(tiny_model_dir):
    proc = run_cli(["scripts/bench/search_efficiency.py", "--quick"], timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    out = proc.stdout
    assert "| searcher | median best after 2 | median best after 4 | per seed after 2 | per seed after 4 |" in out
    assert "| searcher | seed | best after 2 | best after 4 | best trial (number: params) |" in out
    for searcher in ("ours tpe", "ours random", "HF optuna"):
        assert f"\n| {searcher} | " in out, searcher
        assert f"\n| {searcher} | 0 | " in out, searcher  # its seed-0 row in the per-seed table
    assert "TPE vs random at 4: " in out
