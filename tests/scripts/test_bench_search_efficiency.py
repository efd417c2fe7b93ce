"""The search-efficiency benchmark still runs: --quick exits 0 and prints its tables, each searcher's best losses
finite, learned below the base model's and consistent between the tables (no timing asserts)."""
from __future__ import annotations

import re

import pytest

from tests.conftest import number, run_cli, table

pytestmark = pytest.mark.slow  # two real Ray sweeps and one HF search on the tiny model: a few minutes

SEARCHERS = ["ours tpe", "ours random", "HF optuna"]


def test_search_efficiency_quick_prints_one_row_per_searcher(tiny_model_dir):
    proc = run_cli(["scripts/bench/search_efficiency.py", "--quick"], timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    out = proc.stdout
    l0 = number(re.search(r"base eval loss l0 (\S+);", out).group(1))
    assert 5 < l0 < 12, "the untrained tiny model: about ln(vocab) = 10.8"
    summary = {r["searcher"]: r for r in table(out, "| searcher | median best after 2 | median best after 4 | per seed "
                                                    "after 2 | per seed after 4 |")}
    per_seed = {r["searcher"]: r for r in table(out, "| searcher | seed | best after 2 | best after 4 | best trial "
                                                     "(number: params) |")}
    assert list(summary) == list(per_seed) == SEARCHERS
    for searcher in SEARCHERS:
        row, seed0 = summary[searcher], per_seed[searcher]
        after2, after4 = number(row["median best after 2"]), number(row["median best after 4"])
        assert 0 < after4 <= after2 and after4 < l0, row  # the best so far only falls; 4 trials learned something
        # one seed (0): its row and the medians are the same numbers
        assert seed0["seed"] == "0" and (number(seed0["best after 2"]), number(seed0["best after 4"])) == (after2, after4)
        assert (number(row["per seed after 2"]), number(row["per seed after 4"])) == (after2, after4)
        finite, trials = map(int, seed0["finite / trials"].split(" / "))
        assert trials == 4 and 1 <= finite <= 4, seed0
        assert 0 < number(seed0["wall s"]) < 900 and number(row["median wall s"]) == number(seed0["wall s"]), seed0
    verdict = re.search(r"TPE vs random at 4: median (\S+) vs (\S+): ", out)
    assert verdict, out[-2000:]
    assert tuple(map(float, verdict.groups())) == (number(summary["ours tpe"]["median best after 4"]),
                                                   number(summary["ours random"]["median best after 4"]))
