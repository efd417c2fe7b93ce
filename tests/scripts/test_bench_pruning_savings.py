"""scripts/bench/pruning_savings.py --quick: the two runs match cell for cell (refinement off in both), the steps add up,
the saving is the printed steps' and the best configuration and latency rows are consistent (no timing asserts)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import number, run_cli, table

pytestmark = pytest.mark.slow  # two real sweeps of the tiny model side by side: about a minute

STEPS_PER_TRIAL = 8  # smoke.yaml: 2 epochs x 16 facts / batch 4


def test_pruning_savings_quick_matches_every_cell(tiny_model_dir, tmp_path):
    out_json = tmp_path / "pruning.json"
    proc = run_cli(["scripts/bench/pruning_savings.py", "--quick", "--out", str(out_json)], timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    out, m = proc.stdout, json.loads(out_json.read_text())
    assert "search.refine=null" in out.split("\nunpruned: ")[1].split("\n")[0], "refinement off in both runs"
    assert m["matched"] == m["grid"] == m["trials"]["pruned"] == m["trials"]["unpruned"] == 3
    assert "matched grid cells: 3 of the grid's 3" in out

    steps = {r[""]: r for r in table(out, "|  | with pruning | without pruning | saved |")}
    total = steps["optimizer steps (3 matched cells)"]
    pruned, unpruned = number(total["with pruning"]), number(total["without pruning"])
    assert 0 < pruned <= unpruned <= 3 * STEPS_PER_TRIAL
    assert number(total["saved"]) == pytest.approx(100 * (1 - pruned / unpruned), abs=0.5)
    assert number(steps["stopped as diverged"]["without pruning"]) == 0
    assert "stopped by the median rule" in steps  # --quick's pruned run has one; lr.yaml's (rule none) has no such row

    best = table(out, "| run | method | learning_rate | objective (eval_loss) | outcome |")
    assert [r["run"] for r in best] == ["with pruning", "without pruning"]
    assert all(0 < number(r["objective (eval_loss)"]) < 10.8 for r in best), best  # learned below ln(vocab)

    for r in table(out, "| method | learning_rate | past threshold at report # |") if m["latency"] else []:
        if r["latency (reports)"] != "n/a":
            past, stop = number(r["past threshold at report #"]), number(r["stopped at report #"])
            assert number(r["latency (reports)"]) == stop - past >= 0, r

    cells = table(out, "| method | learning_rate | steps with pruning | steps without |")
    assert sorted(number(r["learning_rate"]) for r in cells) == [0.001, 0.03, 3.0]
    for r in cells:
        assert 0 < number(r["steps with pruning"]) <= number(r["steps without"]) <= STEPS_PER_TRIAL, r
    assert sum(number(r["steps with pruning"]) for r in cells) == pruned
    assert sum(number(r["steps without"]) for r in cells) == unpruned
