"""scripts/bench/sweep_overhead.py still runs: its --quick smoke run exits 0 and prints its tables (no timing asserts)."""
from __future__ import annotations

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # a real smoke sweep, an HF search and a start-up rep: a few minutes on 2 CPUs


def test_sweep_overhead_quick_prints_efficiency_breakdown_and_startup(tiny_model_dir):
    proc = run_cli(["scripts/bench/sweep_overhead.py", "--quick"], timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    out = proc.stdout
    for header in ("| runner | trials | slots | wall s | training s | efficiency | efficiency inside fit / search |",
                   "| sweep: part of wall x slots | seconds | % |",
                   "| HF hyperparameter_search: part of wall | seconds | % |",
                   "| start-up: seconds after launch | median of reps | reps | the measured sweep |"):
        assert header in out, header
    for row in ("| this project's sweep (Ray Tune, trials in parallel processes) | 4 | ",  # slots: as many as the CPUs allow
                "| HF Trainer.hyperparameter_search (optuna, one process) | 4 | 1 |",
                "| training (optimizer steps, `train_time_s`) |", "| per-trial start (", "| start-up before Tune x slots (",
                "| finish after fit() x slots (", "| total: wall ", "| total: process wall, launch to exit |",
                "| **first optimizer step done** (`first_step_unix`) |"):
        assert row in out, row
    assert "n/a" not in out.split("| start-up: seconds after launch")[1], "every start-up milestone was measured"
