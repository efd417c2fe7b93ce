"""scripts/bench/search_efficiency.py --quick: each searcher's best losses are finite, below the base model's, only fall
with more trials, and agree between the tables (no timing asserts)."""
from __future__ import annotations

import re

import pytest

from tests.conftest import number, run_cli, table

pytestmark = pytest.mark.slow  # two real Ray sweeps and one HF search side by side: about a minute

SEARCHERS = ["ours tpe", "ours random", "HF optuna"]


def test_search_efficiency_quick_prints_one_row_per_searcher(tiny_model_dir):
    proc = run_cli(["scripts/bench/search_efficiency.py", "--quick"], timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    out = proc.stdout
    l0 = number(re.search(r"base eval loss l0 (\S+);", out).group(1))
    assert 5 < l0 < 12, "the untrained tiny model: about ln(vocab) = 10.8"
    summary = {r["searcher"]: r for r in table(out, "| searcher | median best after 2 | median best after 4 |")}
    per_seed = {r["searcher"]: r for r in table(out, "| searcher | seed | best after 2 | best after 4 |")}
    assert list(summary) == list(per_seed) == SEARCHERS
    for s in SEARCHERS:
        row, seed0 = summary[s], per_seed[s]
        after2, after4 = number(row["median best after 2"]), number(row["median best after 4"])
        assert 0 < after4 <= after2 and after4 < l0, row
        assert seed0["seed"] == "0" and (number(seed0["best after 2"]), number(seed0["best after 4"])) == (after2, after4)
        finite, trials = map(int, seed0["finite / trials"].split(" / "))
        assert trials == 4 and 1 <= finite <= 4, seed0
        assert 0 < number(seed0["wall s"]) < 900
    verdict = re.search(r"TPE vs random at 4: median (\S+) vs (\S+); TPE <= random in (\d) of 1 seeds", out)
    assert verdict, out[-2000:]
    assert tuple(map(float, verdict.groups()[:2])) == (number(summary["ours tpe"]["median best after 4"]),
                                                       number(summary["ours random"]["median best after 4"]))
