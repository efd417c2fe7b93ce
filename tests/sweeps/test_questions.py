"""The findings for the one-example and prompt-weight questions, on constructed records (no training).

    python -m pytest -q tests/sweeps/test_questions.py
"""
from __future__ import annotations

import itertools

from sweeps.results import questions
from sweeps.results.records import TrialRecord

_ids = itertools.count()


def _one(method: str, lr: float, exact: list[float], forgetting: list[float], outcome: str = "converged",
         scheduler: str = "constant") -> TrialRecord:
    """A one-example run: one report per epoch with its exact match and forgetting."""
    history = [{"step": i + 1, "examples_seen": i + 1, "epoch": float(i + 1), "train_loss": 1.0,
                "train_exact_match": em, "forgetting": f} for i, (em, f) in enumerate(zip(exact, forgetting))]
    final = {"l0": 5.0, "eval_loss": 2.0, "done": True, "train_records": 1, "eval_records": 1,
             "base_train_exact_match": 0.0, "train_exact_match": exact[-1], "forgetting": forgetting[-1]}
    return TrialRecord(f"t{next(_ids)}", config={"method": method, "learning_rate": lr, "scheduler": scheduler},
                       params={"method": method, "learning_rate": lr}, history=history, final=final, outcome=outcome,
                       evidence="given")


def test_the_fewest_epochs_to_the_exact_completion_per_method_and_lr_with_their_forgetting():
    records = [_one("full", 1e-4, [0, 0, 0, 0], [0.0, 0.01, 0.02, 0.03]),
               _one("full", 1e-3, [0, 0, 1, 1], [0.1, 0.2, 0.3, 0.5]),
               _one("lora", 1e-2, [0, 1, 0, 1], [0.05, 0.1, 0.12, 0.2])]
    found = questions.findings(records)
    assert found[0] == ("fewest epochs until the training completion came back exactly, per method: full 3 epoch(s) at "
                        "lr 1e-3 (forgetting then +0.30 nats); lora 2 epoch(s) at lr 1e-2 (forgetting then +0.10 nats)")
    assert ("full, lr 1e-4: its training completion never came back exactly in 4 epoch(s) (at most 0%); forgetting at "
            "the end +0.03 nats") in found
    assert ("full, lr 1e-3: its training completion came back exactly (greedy) after 3 epoch(s) (3 examples), and "
            "stayed so to the end; forgetting then +0.30 nats, at the end +0.50 nats") in found
    assert ("lora, lr 1e-2: its training completion came back exactly (greedy) after 2 epoch(s) (2 examples), but not "
            "at every later point (100% at the end); forgetting then +0.10 nats, at the end +0.20 nats") in found


def test_a_schedule_that_decays_over_the_run_is_said_and_a_diverged_run_says_so():
    records = [_one("full", 1e-1, [0, 0], [1.0, 3.0], outcome="diverged"), _one("lora", 1e-2, [0, 1], [0.1, 0.2],
                                                                                  scheduler="cosine")]
    found = questions.findings(records)
    assert found[0].endswith("; never: full (the LR followed a constant/cosine schedule over the whole run, so a run "
                             "stopped at that epoch would not have the same weights)")
    assert found[1].startswith("full, lr 1e-1: its training completion never came back exactly in 2 epoch(s) (at most 0%), "
                               "then diverged (given)")


def test_no_memorization_finding_without_a_curve():
    record = _one("full", 1e-3, [1], [0.1])  # one point: the end only
    assert questions.memorization([record]) == []


def _weighted(method: str, lr: float, weight: float, loss: float, exact: float, forgetting: float,
              outcome: str = "converged") -> TrialRecord:
    final = {"l0": 5.0, "eval_loss": loss, "done": True, "train_exact_match": exact, "forgetting": forgetting,
             "prompt_tokens": 84.0, "completion_tokens": 6.0}
    config = {"method": method, "learning_rate": lr, "prompt_loss_weight": weight}
    return TrialRecord(f"t{next(_ids)}", config=config, params=dict(config), final=final, outcome=outcome, evidence="given")


def test_prompt_weight_findings_give_each_weights_measures_the_change_and_the_mechanism():
    records = [_weighted("full", 1e-3, 0.0, 1.00, 0.5, 0.30), _weighted("full", 1e-3, 0.1, 1.10, 0.25, 0.20),
               _weighted("full", 1e-3, 1.0, 1.40, 0.0, 0.10), _weighted("lora", 1e-2, 0.0, 1.2, 0.25, 0.1),
               _weighted("lora", 1e-2, 1.0, 3.0, 0.0, 0.0, outcome="diverged")]
    found = questions.prompt_weight(records)
    assert found[0] == ("which tokens carry the loss: each completion token weighs 1 and each prompt token "
                        "prompt_loss_weight (0: the completion alone; 1: the whole sequence alike); with 84 prompt and 6 "
                        "completion tokens an example, the prompt's share of it is 0: 0%, 0.1: 58%, 1: 93%")
    assert ("full, lr 1e-3: weight 0: held-out loss 1.00, exact match 50%, forgetting +0.30; weight 0.1: held-out loss "
            "1.10, exact match 25%, forgetting +0.20; weight 1: held-out loss 1.40, exact match 0%, forgetting +0.10") in found
    assert "lora, lr 1e-2: weight 0: held-out loss 1.20, exact match 25%, forgetting +0.10; weight 1: diverged (given)" in found
    assert ("full: from prompt_loss_weight 0 to 1: lr 1e-3: held-out loss +0.40, exact match -50 points, forgetting "
            "-0.20 nats") in found
    assert ("lora: from prompt_loss_weight 0 to 1: lr 1e-2: not stated (weight 0 converged, weight 1 diverged: a change "
            "is stated only between trials that both converged)") in found


def test_no_prompt_weight_finding_when_the_weight_was_not_varied():
    assert questions.prompt_weight([_weighted("full", 1e-3, 0.0, 1.0, 0.5, 0.3)]) == []
