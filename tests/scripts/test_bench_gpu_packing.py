"""The GPU packing benchmark still runs: its --quick mode (tiny model, CPU) packs 1 and 2 trials and prints the table."""
from __future__ import annotations

import re

import pytest

from tests.conftest import number, run_cli, table

pytestmark = pytest.mark.slow  # starts real trainer processes


def test_gpu_packing_quick_packs_one_and_two_trials_on_the_cpu(tiny_model_dir):
    proc = run_cli(["scripts/bench/gpu_packing.py", "--quick"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table(proc.stdout, "| trials sharing the GPU | wall s | trials/hour | vs 1 | mean GPU util % | max GPU mem MB |")
    assert [r["trials sharing the GPU"] for r in rows] == ["1", "2"]
    walls, per_hour = [number(r["wall s"]) for r in rows], [number(r["trials/hour"]) for r in rows]
    for n, wall, rate, row in zip((1, 2), walls, per_hour, rows):
        # n processes that each import torch, load the tiny model and train 4 steps: 7 and 14 s on 2 shared CPUs
        assert 2 < wall < 150, row
        assert rate == pytest.approx(n * 3600 / wall, rel=0.03), row  # wall printed to 0.1 s
        assert number(row["vs 1"]) == pytest.approx(rate / per_hour[0], abs=0.01), row
        assert row["mean GPU util %"] == row["max GPU mem MB"] == "-", "no nvidia-smi on the CPU"
    assert number(rows[0]["vs 1"]) == 1 and 0.3 < number(rows[1]["vs 1"]) <= 2.05, "two trials at most double the rate"
    inside = re.search(r"mean seconds inside optimizer steps per trial: 1 sharing -> (\S+), 2 sharing -> (\S+)\n", proc.stdout)
    assert inside, proc.stdout[-2000:]
    for seconds, wall in zip(map(number, inside.groups()), walls):  # to 0.1 s: 4 steps may round to 0.0 on a fast CPU
        assert 0 <= seconds < wall, proc.stdout[-2000:]
