"""Learning against forgetting: the Pareto front, the comparison of methods at equal held-out loss, the
best-loss trial's perplexity factor, parameter importance, and the front of a multi-objective search.

Fast: synthetic TrialRecords (no Ray, no training).

    python -m pytest -q tests/sweeps/test_tradeoff.py
"""
from __future__ import annotations

import itertools
import math
import random

import pytest

from sweeps.launch.finish import pareto_ids
from sweeps.results import importance, tradeoff
from sweeps.results.records import TrialRecord
from sweeps.spec import SweepSpec

_ids = itertools.count()


def _trial(method: str, lr: float, loss: float | None, forgetting: float | None, outcome: str = "converged",
           **params) -> TrialRecord:
    final = {"l0": 5.0, "status": "diverged" if outcome == "diverged" else "completed", "done": True}
    if loss is not None:
        final["eval_loss"] = loss
    if forgetting is not None:
        final["forgetting"] = forgetting
    chosen = {"method": method, "learning_rate": lr, **params}
    return TrialRecord(trial_id=f"t{next(_ids)}", config={"batch_size": 4, **chosen}, params=chosen, final=final,
                       outcome=outcome)


def _issue_table() -> list[TrialRecord]:
    """The lr.yaml trials quoted in issue 14, plus its best trial."""
    return [_trial("full", 1e-3, 0.99, 1.92, batch_size=8), _trial("full", 1e-4, 2.12, 0.13),
            _trial("lora", 1e-3, 3.61, 0.07, batch_size=8), _trial("full", 1e-3, 1.17, 3.89),
            _trial("lora", 1e-2, 1.18, 2.13)]


def test_the_front_keeps_only_trials_no_other_beats_on_both_and_sorts_by_loss():
    front = tradeoff.front(tradeoff.points(_issue_table()))
    assert [(p.loss, p.forgetting) for p in front] == [(0.99, 1.92), (2.12, 0.13), (3.61, 0.07)]


def test_stopped_failed_and_unmeasured_trials_are_not_points():
    records = [_trial("full", 1e-2, 0.5, 0.01, outcome="diverged"), _trial("full", 1e-2, 0.5, 0.01, outcome="pruned"),
               _trial("full", 1e-2, None, None, outcome="failed"), _trial("full", 1e-3, 1.0, None),
               _trial("full", 1e-4, 2.0, 0.2)]
    assert [(p.loss, p.forgetting) for p in tradeoff.points(records)] == [(2.0, 0.2)]


def test_a_front_is_read_as_a_staircase_of_the_least_forgetting_at_or_below_a_loss():
    front = tradeoff.front(tradeoff.points(_issue_table()))
    assert tradeoff.least_forgetting(front, 0.9) is None
    assert tradeoff.least_forgetting(front, 1.5) == 1.92
    assert tradeoff.least_forgetting(front, 2.12) == 0.13
    assert tradeoff.least_forgetting(front, 9.0) == 0.07


def test_methods_are_compared_at_equal_loss_only_where_both_fronts_reach():
    full = tradeoff.front(tradeoff.points([_trial("full", 1e-3, 1.0, 2.0), _trial("full", 1e-4, 2.0, 1.0),
                                           _trial("full", 1e-5, 3.0, 0.6)]))
    lora = tradeoff.front(tradeoff.points([_trial("lora", 1e-2, 1.5, 0.8), _trial("lora", 1e-3, 2.5, 0.3),
                                           _trial("lora", 1e-4, 4.0, 0.1)]))
    text = tradeoff.compare("full", full, "lora", lora)
    # common loss 1.5 .. 3.0: full forgets 2.0, 1.0, 1.0, 0.6 at 1.5, 2.0, 2.5, 3.0; lora 0.8, 0.8, 0.3, 0.3
    assert "at held-out loss 1.50 to 3.00 lora forgot 0.20 to 1.20 nats less than full" in text
    assert f"{math.exp(0.2):.2f}x to {math.exp(1.2):.2f}x lower" in text
    assert "4.00" not in text, "lora's front beyond full's is no comparison"


def test_methods_whose_fronts_share_no_loss_are_not_compared():
    full = tradeoff.front(tradeoff.points([_trial("full", 1e-3, 1.0, 2.0)]))
    lora = tradeoff.front(tradeoff.points([_trial("lora", 1e-3, 3.0, 0.1), _trial("lora", 1e-4, 3.5, 0.05)]))
    text = tradeoff.compare("full", full, "lora", lora)
    assert "share no held-out loss (full 1.00, lora 3.00 to 3.50)" in text and "forgot" not in text


def test_a_comparison_says_where_each_method_forgot_less_when_they_cross():
    lora = tradeoff.front(tradeoff.points([_trial("lora", 1e-3, 1.0, 0.4), _trial("lora", 1e-4, 3.0, 0.39)]))
    full = tradeoff.front(tradeoff.points([_trial("full", 1e-3, 1.0, 1.0), _trial("full", 1e-4, 2.0, 0.1),
                                           _trial("full", 1e-5, 3.0, 0.05)]))
    text = tradeoff.compare("full", full, "lora", lora)
    assert "at held-out loss 1.00 to 2.00 lora forgot 0.60 nats less than full" in text
    assert "at held-out loss 2.00 to 3.00 full forgot 0.30 to 0.34 nats less than lora" in text


def test_findings_give_the_front_each_pair_and_the_best_loss_trials_perplexity_factor():
    found = tradeoff.findings(_issue_table())
    assert found[0].startswith("trade-off front (held-out loss against forgetting, 3 of 5 finished trials")
    assert "full lr 1e-3 bs 8: loss 0.99, forgetting +1.92" in found[0]
    assert any(f.startswith("full vs lora, read off their fronts") for f in found)
    assert found[-1] == ("the lowest held-out loss (full lr 1e-3 bs 8: 0.990) forgot +1.92 nats: its perplexity on "
                         f"the reference text is {math.exp(1.92):.2f}x the base model's")


def test_no_forgetting_measured_means_no_tradeoff_findings():
    assert tradeoff.findings([_trial("full", 1e-3, 1.0, None)]) == []


def _random_sweep(n: int, seed: int = 0) -> list[TrialRecord]:
    """The held-out loss depends on the learning rate alone; the forgetting on the method alone."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        method, lr = rng.choice(["full", "lora"]), 10 ** rng.uniform(-5, -1)
        extra = {"lora_r": rng.choice([4, 16])} if method == "lora" else {}
        out.append(_trial(method, lr, 1 + abs(math.log10(lr) + 3) + 0.01 * rng.random(),
                          (1.5 if method == "full" else 0.1) + 0.01 * rng.random(), batch_size=rng.choice([4, 8]),
                          **extra))
    return out


def test_importance_names_the_setting_that_drove_each_objective():
    found = importance.importances(_random_sweep(30))
    assert next(iter(found["held-out loss"])) == "learning_rate"
    assert next(iter(found["forgetting"])) == "method"
    assert sum(found["forgetting"].values()) == pytest.approx(1.0)
    assert "lora_r" not in found["held-out loss"], "fANOVA cannot assess a setting only LoRA trials have"


def test_importance_needs_enough_finished_trials_and_says_so():
    records = _random_sweep(importance.MIN_TRIALS - 1)
    assert importance.importances(records) == {}
    assert importance.findings(records, {}) == [
        f"parameter importance needs >= {importance.MIN_TRIALS} finished trials that differ in 2 or more settings "
        f"(this sweep: {importance.MIN_TRIALS - 1} finished)"]


def _spec(metric, mode) -> SweepSpec:
    return SweepSpec.model_validate({"name": "t", "model": "tiny", "space": {"method": ["full"]},
                                     "search": {"metric": metric, "mode": mode}, "pruning": {"rule": "none"}})


def test_a_multi_objective_search_marks_the_front_of_its_own_metrics_and_modes():
    records = [_trial("full", 1e-3, 1.0, 0.5), _trial("full", 1e-4, 2.0, 0.1), _trial("full", 1e-5, 3.0, 0.2)]
    for r, em in zip(records, (0.9, 0.5, 0.8)):
        r.final["train_exact_match"] = em
    first, second, third = (r.trial_id for r in records)
    assert pareto_ids(records, _spec(["eval_loss", "forgetting"], ["min", "min"])) == {first, second}
    # forgetting down, exact match up: the third trial (0.2 nats, 0.8) is beaten by neither other trial on both
    assert pareto_ids(records, _spec(["forgetting", "train_exact_match"], ["min", "max"])) == {first, second, third}
    # one objective: the front marked is still held-out loss against forgetting
    assert pareto_ids(records, _spec("eval_loss", "min")) == {first, second}
