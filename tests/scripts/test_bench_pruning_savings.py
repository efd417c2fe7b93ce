"""The pruning-savings benchmark still runs: its --quick smoke run exits 0 and prints every table, its numbers
consistent with each other and with the JSON it writes (no timing asserts)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import number, run_cli, table

pytestmark = pytest.mark.slow  # two real sweeps (Ray, Optuna, MLflow, torch) on the tiny model: a minute or two

STEPS_PER_TRIAL = 8  # smoke.yaml: 2 epochs x 16 facts / batch 4


def test_pruning_savings_quick_prints_steps_best_latency_and_trials(tiny_model_dir, tmp_path):
    out_json = tmp_path / "pruning.json"
    proc = run_cli(["scripts/bench/pruning_savings.py", "--quick", "--json", str(out_json)], timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    out = proc.stdout
    figures = json.loads(out_json.read_text())
    assert figures["matched"] == 3 and figures["steps_unpruned"] > 0
    assert {row["learning_rate"] for row in figures["trials"]} == {0.001, 0.03, 3.0}

    steps = {r[""]: r for r in table(out, "| | with pruning | without pruning | saved |")}
    total = steps["optimizer steps (3 matched trials)"]
    pruned, unpruned = number(total["with pruning"]), number(total["without pruning"])
    assert (pruned, unpruned) == (figures["steps_pruned"], figures["steps_unpruned"])
    assert 0 < pruned <= unpruned <= 3 * STEPS_PER_TRIAL
    assert number(total["saved"]) == pytest.approx(100 * (1 - pruned / unpruned), abs=0.5)
    assert number(steps["trials"]["with pruning"]) == number(steps["trials"]["without pruning"]) == 3
    for label in ("stopped by the rule (median)", "stopped as diverged", "failed"):
        assert all(0 <= number(steps[label][run]) <= 3 for run in ("with pruning", "without pruning")), label

    best = table(out, "| run | method | learning_rate | batch_size | objective (eval_loss, min) | outcome |")
    assert [r["run"] for r in best] == ["with pruning", "without pruning"]
    for r in best:  # a trial kept to its end: the tiny model starts near ln(vocab) = 10.8 and learns from there
        assert 0 < number(r["objective (eval_loss, min)"]) < 10.8 and r["outcome"] not in ("pruned", "diverged", "failed"), r

    latency = table(out, "| method | lr | bs | past threshold at report # (examples) | stopped at report # (examples) |")
    for r in latency:
        past, stop = r["past threshold at report # (examples)"], number(r["stopped at report # (examples)"])
        assert 1 <= stop <= STEPS_PER_TRIAL, r
        if not past.startswith("never"):
            assert number(r["latency (reports)"]) == stop - number(past) >= 0, r

    trials = table(out, "| method | lr | bs | steps with pruning | steps without | outcome with pruning | outcome without |")
    assert sorted(f"{r['method']} {r['lr']} {r['bs']}" for r in trials) == ["full 0.001 4", "full 0.03 4", "full 3 4"]
    for r in trials:  # every cell of the quick grid, side by side
        assert 0 < number(r["steps with pruning"]) <= number(r["steps without"]) <= STEPS_PER_TRIAL, r
    assert sum(number(r["steps with pruning"]) for r in trials) == pruned
    assert sum(number(r["steps without"]) for r in trials) == unpruned
