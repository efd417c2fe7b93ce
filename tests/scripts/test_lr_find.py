"""The learning-rate range test: suggestion math, and a real run that stops by itself."""
from __future__ import annotations

import json
import math

import pytest

from sweeps.lr_range import suggest
from sweeps.spec import load_spec
from tests.conftest import run_cli


def test_suggestions_on_a_u_shaped_curve():
    lrs = [10 ** (-7 + 7 * i / 99) for i in range(100)]
    losses = [2 + 2 * math.tanh(-(math.log10(lr) + 3)) + (max(0, math.log10(lr) + 1.5) ** 3) * 20 for lr in lrs]
    s = suggest(lrs, losses)
    assert s["steepest"] < s["min_loss"] < s["diverge"]
    assert s["low"] < s["high"]


def test_a_curve_that_never_diverges_proposes_ten_times_its_minimum():
    lrs = [10 ** (-6 + i / 10) for i in range(30)]
    s = suggest(lrs, [5 - i * 0.1 for i in range(30)])
    assert s["diverge"] is None and s["high"] == pytest.approx(s["min_loss"] * 10)


@pytest.mark.slow
def test_range_test_on_the_tiny_model_stops_by_itself_and_writes_a_spec(tmp_path, tiny_model_dir):
    new_spec = tmp_path / "found.yaml"
    proc = run_cli(["scripts/lr_find.py", "search_spaces/smoke.yaml", "--methods", "full", "--steps", "60",
                    "--end", "100", "--out", str(tmp_path), "--write", str(new_spec)], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (res,) = json.loads((tmp_path / "lr_find.json").read_text())
    assert res["status"] == "diverged" and res["steps"] < 60, "it must stop before the end of the ramp"
    assert (tmp_path / "lr_find.png").stat().st_size > 10_000
    spec = load_spec(new_spec)
    bounds = spec.space["learning_rate"].per_method["full"]
    assert bounds.low == pytest.approx(res["suggestions"]["low"], rel=0.05)
