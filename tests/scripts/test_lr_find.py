"""The learning-rate range test: the rule that reads a curve, and a real run that stops by itself."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from sweeps.results.lr_range import suggest
from sweeps.spec import load_spec
from tests.conftest import run_cli


def decades(s: dict) -> float:
    return math.log10(s["high"] / s["low"])


def test_suggestions_on_a_u_shaped_curve():
    lrs = [10 ** (-7 + 7 * i / 99) for i in range(100)]
    losses = [2 + 2 * math.tanh(-(math.log10(lr) + 3)) + (max(0, math.log10(lr) + 1.5) ** 3) * 20 for lr in lrs]
    s = suggest(lrs, losses)
    assert s["skip"] < s["steepest"] < s["min_loss"] < s["diverge"]
    assert s["low"] < s["min_loss"] < s["high"] and decades(s) <= 2 + 1e-9


def test_a_curve_that_never_diverges_proposes_ten_times_its_minimum():
    lrs = [10 ** (-6 + i / 10) for i in range(30)]
    s = suggest(lrs, [5 - i * 0.1 for i in range(30)])
    assert s["diverge"] is None and s["high"] == pytest.approx(s["min_loss"] * 10, rel=0.05)


def test_the_upper_bound_is_a_decade_above_the_minimum_even_past_the_ramps_blow_up():
    """The blow-up is reported, not used as a bound (sweeps/launch/lr_find.py says so): on lr.yaml, full's ramp passed
    4x its minimum at 5.6e-3 while the sweep's 2-epoch trials diverged only from 1e-2."""
    lrs = [10 ** (-6 + i / 12) for i in range(61)]

    def loss(lr):  # falls to a floor by 1e-3, then blows up e^8 a decade: 4x its minimum within 0.2 decades
        u = math.log10(lr)
        return (1 + 4 / (1 + math.exp(3 * (u + 4)))) * math.exp(8 * max(0.0, u + 3))

    s = suggest(lrs, [loss(lr) for lr in lrs])
    assert s["diverge"] is not None and s["min_loss"] < s["diverge"] < s["high"] / 2
    assert s["high"] == pytest.approx(float(f"{s['min_loss']:.2g}") * 10)


@pytest.mark.parametrize("per_decade", [8, 12, 20])
def test_a_noisy_start_a_valley_and_a_blow_up_give_two_decades_around_the_valley(per_decade):
    """Like lr.yaml's curves: a ramp from 1e-6, batches whose losses differ by 2x, a start-up stretch whose first
    steps plunge (the old rule's 'steepest descent'), a valley at 1e-3, then a blow-up (12x a decade)."""
    rng = random.Random(0)
    lrs = [10 ** (-6 + i / per_decade) for i in range(5 * per_decade + 1)]

    def clean(lr):
        u = math.log10(lr)
        return (1 + 4 / (1 + math.exp(3 * (u + 4)))) * math.exp(2.5 * max(0.0, u + 3))

    losses = [clean(lr) * math.exp(rng.gauss(0, 0.35)) for lr in lrs]
    losses[:4] = [9.0, 2.0, 7.0, 2.5]  # one hard batch, then easy ones: a plunge at the very start
    valley = min((10 ** (-5 + i / 1000) for i in range(4000)), key=clean)
    assert valley == pytest.approx(1e-3, rel=0.01)

    s = suggest(lrs, losses)
    assert decades(s) <= 2 + 1e-9
    assert s["low"] * 3 <= valley <= s["high"] / 3, "inside, and not at an edge: room for a 3x refinement either way"
    assert s["skip"] > lrs[4] and s["steepest"] > s["skip"], "the start-up plunge is skipped"
    assert s["diverge"] is not None and s["min_loss"] < s["diverge"]


@pytest.mark.parametrize("args, message", [
    (["--methods", "full,nope"], "--methods: unknown method 'nope'"),
    (["--start", "1", "--end", "0.1"], "--start and --end"),
    (["--per-decade", "0"], "--per-decade must be > 0"),
    (["--steps", "2"], "--steps must be at least 3"),
    (["--best", "full=fast"], "--best: expected method=LR pairs"),
    (["--best", "lora=1e-2", "--methods", "full"], "--best: expected method=LR pairs"),
])
def test_bad_input_exits_2_with_one_message(args, message, capsys, tmp_path):
    from sweeps.launch.lr_find import main

    assert main(["search_spaces/smoke.yaml", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err


@pytest.mark.slow
def test_range_test_on_the_tiny_model_stops_by_itself_and_writes_a_spec(tmp_path, tiny_model_dir):
    new_spec = tmp_path / "found.yaml"
    proc = run_cli(["-m", "sweeps.cli", "lr-find", "search_spaces/smoke.yaml", "--methods", "full", "--steps", "60",
                    "--end", "100", "--best", "full=1e-2", "--out", str(tmp_path), "--write", str(new_spec)], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (res,) = json.loads((tmp_path / "lr_find.json").read_text())
    assert res["status"] == "diverged" and res["steps"] < 60, "it must stop before the end of the ramp"
    assert (tmp_path / "lr_find.png").stat().st_size > 10_000
    s = res["suggestions"]
    assert s["low"] < s["min_loss"] < s["high"] and decades(s) <= 2 + 1e-9
    assert isinstance(res["inside"], bool) and "inside" in proc.stdout
    spec = load_spec(new_spec)
    bounds = spec.space["learning_rate"].per_method["full"]
    assert bounds.low == pytest.approx(s["low"], rel=0.05) and bounds.high == pytest.approx(s["high"], rel=0.05)
    assert "per_method:" in proc.stdout, "the block to paste is printed"
    data = yaml.safe_load(Path("search_spaces/smoke.yaml").read_text())
    data["space"].update(yaml.safe_load((tmp_path / "learning_rate.yaml").read_text()))  # pasted into a spec
    (tmp_path / "pasted.yaml").write_text(yaml.safe_dump(data))
    assert load_spec(tmp_path / "pasted.yaml").space["learning_rate"].per_method["full"] == bounds
