"""scripts/bench/gpu_check.py --quick (the CPU, tiny model): part A's two real sweeps and part B's three training rows
each carry numbers, not only headers: every trial completed, rates and peaks positive (no timing asserts)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import number, run_cli, table

pytestmark = pytest.mark.slow  # two real Ray sweeps of the tiny model, and three training runs


def test_gpu_check_quick_fills_both_parts_rows(tiny_model_dir, tmp_path):
    out_md = tmp_path / "gpu_check.md"
    proc = run_cli(["scripts/bench/gpu_check.py", "--quick", "--out", str(out_md)], timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    out = proc.stdout
    assert out.startswith("command: python scripts/bench/gpu_check.py --quick") and "\ncommit: " in out
    assert "GPU: none" in out and "\nversions: torch " in out

    rows = {r["row"]: r for r in table(out, "| row | resources | runs |")}
    assert list(rows) == ["packed", "one at a time"]
    for r in rows.values():  # part A: each row ran the 2-cell grid once, and only completed trials count
        assert r["runs"] == "1" and r["trials completed / run"] == "2 of 2", r
        assert number(r["wall s"]) > 0 and number(r["completed trials/hour"]) > 0 and number(r["largest peak GiB"]) > 0, r
        assert r["mean GPU busy %"] == "n/a", r
    assert rows["one at a time"]["most trials at once"] == "1"  # search.max_concurrent=1
    assert "packed / one at a time, completed trials per hour: **" in out

    rows_b = table(out, "| model | method | optimizer | status |")
    assert [(r["model"], r["method"]) for r in rows_b] == [("tiny", "lora"), ("tiny", "qlora"), ("tiny", "full")]
    for r in rows_b:
        assert r["status"] == "completed", r
        for column in ("estimate GiB", "measured peak GiB", "tokens/s after step 1", "s/step after step 1"):
            assert number(r[column]) > 0, (column, r)

    assert out_md.read_text().strip() == out.strip()  # --out: the same report, kept as it grew
    figures = json.loads(out_md.with_suffix(".json").read_text())
    assert [r["completed"] for r in figures["a"]["runs"]] == [2, 2]
    assert all(r["peak_bytes"] > 0 and r["tokens_per_s"] > 0 for r in figures["b"]["rows"])
