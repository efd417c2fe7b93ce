"""scripts/bench/sweep_overhead.py --quick: the shares are ratios of the printed seconds, between 0 and 1, the parts add up
to wall x slots, the trial counts are the sweep's, and the start-up milestones come in order (no timing asserts)."""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import number, run_cli, table

pytestmark = pytest.mark.slow  # a real smoke sweep, an HF search and a start-up rep: about a minute and a half


def test_sweep_overhead_quick_shares_breakdown_and_startup(tiny_model_dir, tmp_path):
    out_json = tmp_path / "overhead.json"
    proc = run_cli(["scripts/bench/sweep_overhead.py", "--quick", "--out", str(out_json)], timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    out, figures = proc.stdout, json.loads(out_json.read_text())
    assert "\ncommit: " in out and "\nmachine: " in out and "\nversions: torch " in out
    sweep, hf = figures["sweep"], figures["hf"]
    assert sweep["trials"] == sum(sweep["outcomes"].values()) == 4  # smoke.yaml's 2 x 2 grid, as run
    eff = table(out, "| runner | trials | slots | wall s |")
    assert [number(r["trials"]) for r in eff] == [4, 4] and number(eff[1]["slots"]) == 1
    assert 1 <= number(eff[0]["slots"]) <= (os.cpu_count() or 1)
    for r, share_of in zip(eff, (sweep["total"], hf["search_s"])):
        training, evals = number(r["training s"]), number(r["eval s"])
        assert 0 < training and 0 < evals and training + evals < share_of, r
        share, useful = number(r["training share"]), number(r["useful share (training + eval)"])
        assert 0 < share < useful <= 1, r
        assert useful == pytest.approx((training + evals) / share_of, abs=0.01), r
    assert 0 < hf["startup_s"] < hf["first_step_s"], "HF's start-up is reported apart, before its first step"

    parts = table(out, "| sweep: part of wall x slots | seconds | % |")
    *rows, total = parts
    assert total["sweep: part of wall x slots"].startswith("total")
    assert number(total["seconds"]) == pytest.approx(sweep["total"], abs=0.06)
    assert all(number(r["seconds"]) > -1 for r in rows) and number(rows[0]["seconds"]) > 0
    assert sum(number(r["seconds"]) for r in rows) == pytest.approx(sweep["total"], abs=0.06 * len(rows))
    assert sum(number(r["%"]) for r in rows) == pytest.approx(100, abs=0.06 * len(rows))

    startup = table(out, "| start-up: seconds after launch |")
    assert len(startup) == 4
    for column in ("median of reps", "the measured sweep"):  # every milestone measured, each after the one before
        seconds = [number(r[column]) for r in startup]
        assert 0 < seconds[0] and seconds == sorted(seconds) and seconds[-1] < 900, (column, seconds)
