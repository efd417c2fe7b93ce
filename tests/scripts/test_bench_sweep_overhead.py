"""scripts/bench/sweep_overhead.py still runs: its --quick smoke run exits 0 and prints its tables, whose numbers add
up (efficiency = training / (wall x slots); the parts sum to their total; start-up milestones in order)."""
from __future__ import annotations

import os

import pytest

from tests.conftest import number, run_cli, table

pytestmark = pytest.mark.slow  # a real smoke sweep, an HF search and a start-up rep: a few minutes on 2 CPUs

SWEEP = "this project's sweep (Ray Tune, trials in parallel processes)"
HF = "HF Trainer.hyperparameter_search (optuna, one process)"


def _parts_add_up(rows: list[dict], label: str, total: float, slots: float) -> None:
    """Each part finite, training positive; seconds and % sum to the total row, which is wall x slots (each printed
    to 0.1: the wall read from its table is off by up to 0.05, times the slots)."""
    *parts, last = rows
    assert last[label].startswith("total") and number(last["seconds"]) == pytest.approx(total, abs=0.05 * slots + 0.06)
    assert number(parts[0]["seconds"]) > 0, parts[0]  # training
    assert sum(number(r["seconds"]) for r in parts) == pytest.approx(total, abs=0.06 * len(parts))
    assert sum(number(r["%"]) for r in parts) == pytest.approx(100, abs=0.06 * len(parts))


def test_sweep_overhead_quick_prints_efficiency_breakdown_and_startup(tiny_model_dir):
    proc = run_cli(["scripts/bench/sweep_overhead.py", "--quick"], timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    out = proc.stdout
    eff = {r["runner"]: r for r in table(out, "| runner | trials | slots | wall s | training s | efficiency | efficiency "
                                              "inside fit / search |")}
    assert list(eff) == [SWEEP, HF]
    assert eff[SWEEP]["trials"] == eff[HF]["trials"] == "4" and eff[HF]["slots"] == "1"
    assert 1 <= number(eff[SWEEP]["slots"]) <= (os.cpu_count() or 1), "slots: as many as the CPUs allow"
    for r in eff.values():
        wall, training, slots = number(r["wall s"]), number(r["training s"]), number(r["slots"])
        assert 0 < training < wall * slots and wall < 900, r  # 28 s and 90 s of wall on 2 shared CPUs
        assert number(r["efficiency"]) == pytest.approx(training / (wall * slots), abs=0.006 + 0.05 / wall), r
        assert number(r["efficiency"]) <= number(r["efficiency inside fit / search"]) <= 1.005, r

    sweep_wall, slots = number(eff[SWEEP]["wall s"]), number(eff[SWEEP]["slots"])
    sweep_parts = table(out, "| sweep: part of wall x slots | seconds | % |")
    _parts_add_up(sweep_parts, "sweep: part of wall x slots", sweep_wall * slots, slots)
    labels = [r["sweep: part of wall x slots"].split(" (")[0] for r in sweep_parts]
    for part in ("training", "per-trial start", "start-up before Tune x slots", "finish after fit() x slots"):
        assert part in labels, (part, labels)
    assert number(sweep_parts[0]["seconds"]) == number(eff[SWEEP]["training s"])
    hf_parts = table(out, "| HF hyperparameter_search: part of wall | seconds | % |")
    _parts_add_up(hf_parts, "HF hyperparameter_search: part of wall", number(eff[HF]["wall s"]), 1)
    assert number(hf_parts[0]["seconds"]) == number(eff[HF]["training s"])

    startup = table(out, "| start-up: seconds after launch | median of reps | reps | the measured sweep |")
    assert [r["start-up: seconds after launch"].split(" (")[0] for r in startup] == [
        "Ray and MLflow up", "first trial started by Tune", "first trainer began", "**first optimizer step done**"]
    for column in ("median of reps", "the measured sweep"):  # every milestone measured, each after the one before
        seconds = [number(r[column]) for r in startup]
        assert 0 < seconds[0] and seconds == sorted(seconds), (column, seconds)
    assert number(startup[-1]["the measured sweep"]) < sweep_wall, "the first step is done before the sweep ends"
    assert "n/a" not in out.split("| start-up: seconds after launch")[1], "every start-up milestone was measured"
