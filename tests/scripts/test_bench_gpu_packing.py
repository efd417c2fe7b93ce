"""The GPU packing benchmark still runs: its --quick mode (tiny model, CPU) packs 1 and 2 trials and prints the table."""
from __future__ import annotations

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # starts real trainer processes


def test_gpu_packing_quick_packs_one_and_two_trials_on_the_cpu(tiny_model_dir):
    proc = run_cli(["scripts/bench/gpu_packing.py", "--quick"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| trials sharing the GPU | wall s | trials/hour | vs 1 | mean GPU util % | max GPU mem MB |" in proc.stdout
    assert "\n| 1 | " in proc.stdout and "\n| 2 | " in proc.stdout
