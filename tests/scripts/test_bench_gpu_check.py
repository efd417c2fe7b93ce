"""scripts/bench/gpu_check.py still runs: its --quick mode (the CPU, tiny model) runs part A's two real sweeps and
part B's three training rows, and every row carries numbers, not only the headers (no timing asserts)."""
from __future__ import annotations

import json

import pytest

from scripts.bench.gpu_check import HEADER_A, HEADER_A_RUNS, HEADER_B
from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # two real Ray sweeps of the tiny model, and three training runs


def _rows(out: str, header: str) -> list[list[str]]:
    """The cells of the markdown table under ``header`` (after its |---| line)."""
    lines = out.splitlines()
    assert header in lines, header
    rows = []
    for line in lines[lines.index(header) + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _positive(cell: str) -> float:
    value = float(cell.split()[0])  # "958" or "958 (933-982)": the mean
    assert value > 0, cell
    return value


def test_gpu_check_quick_fills_both_parts_rows(tiny_model_dir, tmp_path):
    out_md, out_json = tmp_path / "gpu_check.md", tmp_path / "gpu_check.json"
    proc = run_cli(["scripts/bench/gpu_check.py", "--quick", "--out", str(out_md), "--json", str(out_json)], timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    out = proc.stdout
    assert out.startswith("command: python scripts/bench/gpu_check.py --quick")
    assert "\nmachine: " in out and "GPU: none" in out and "\nversions: torch " in out

    # part A: both rows ran the 2-cell grid once, every trial completed
    rows = {r[0]: r for r in _rows(out, HEADER_A)}
    assert list(rows) == ["packed", "one at a time"]
    for row in rows.values():
        assert row[2] == "1", row  # runs
        _positive(row[3])  # wall s
        assert row[4] == "2 of 2", row  # every trial completed
        _positive(row[5])  # completed trials per hour
        assert row[6] == "n/a", row  # no GPU: no busy %
        _positive(row[9])  # the largest trial's peak memory (its resident set on the CPU)
    assert rows["one at a time"][7] == "1"  # search.max_concurrent=1: never two trials at once
    assert "packed / one at a time, completed trials per hour: **" in out
    runs = _rows(out, HEADER_A_RUNS)
    assert sorted(r[2] for r in runs) == ["one at a time", "packed"]
    assert all(r[4] == r[5] == "2" and float(r[6]) > 0 for r in runs), runs

    # part B: LoRA, QLoRA and full fine-tuning of a model built from the tiny preset's config, each completed
    rows_b = _rows(out, HEADER_B)
    assert [(r[0], r[1], r[2]) for r in rows_b] == [("tiny", "lora", "adamw"), ("tiny", "qlora", "adamw"),
                                                    ("tiny", "full", "adamw")]
    for row in rows_b:
        assert row[3] == "completed", row
        assert row[4] == "n/a" or _positive(row[4])  # the estimate: n/a where trainer.memory.estimate is missing
        _positive(row[5])  # measured peak
        _positive(row[7])  # tokens/s after step 1
        _positive(row[8])  # s/step after step 1
    assert "torchtune README memory table" in out

    # --out holds the same report; --json the same figures
    report = out_md.read_text()
    assert HEADER_A in report and HEADER_B in report and "packed / one at a time" in report
    figures = json.loads(out_json.read_text())
    assert [r["completed"] for r in figures["a"]["runs"]] == [2, 2]
    assert [r["status"] for r in figures["b"]["rows"]] == ["completed"] * 3
    assert all(r["peak_gib"] > 0 and r["tokens_per_s"] > 0 for r in figures["b"]["rows"])
