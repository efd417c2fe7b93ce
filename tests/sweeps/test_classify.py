"""Curve classification on constructed loss curves: one class each, every sub-rule, thresholds at the boundary.

Fast: synthetic TrialRecords shaped like the trainer's reports (no Ray, no training).

    python -m pytest -q tests/sweeps/test_classify.py
"""
from __future__ import annotations

import math

import pytest

from sweeps.results.classify import classify, classify_all
from sweeps.results.records import TrialRecord
from trainer.curves import Thresholds, smooth

L0 = 3.0  # eval loss of the base model in every constructed trial
BS = 8  # one step per report (report_every 8), so examples_seen = 8 x report number


def _decay(n: int = 40) -> list[float]:
    """A healthy curve: 3.0 falling to a plateau near 1.0."""
    return [1.0 + 2.0 * math.exp(-i / 5) for i in range(n)]


def _plateau(n: int = 120, level=lambda i: 1.0, start: int = 40) -> list[float]:
    """3.0 falling for ``start`` reports, then exactly ``level(i)``: a known minimum, windows with a known mean and sigma."""
    return [1.0 + 2.0 * math.exp(-i / 5) if i < start else level(i) for i in range(n)]


def _record(losses: list[float | None], *, smooth_: list[float] | None = None, final_eval: float | None = 1.2,
            status: str = "completed", reason: str = "", stopped_by: str | None = None,
            error: str | None = None, done: bool = True, evals: list[float] | None = None) -> TrialRecord:
    """A trial as the trainer reports it: one history row per report, the last report as ``final``.

    Eval points every 4th report follow the train curve from l0 down to ``final_eval`` (so a healthy curve's
    held-out loss falls with it), unless ``evals`` gives them."""
    if smooth_ is None and all(v is not None for v in losses):
        smooth_ = smooth(losses)
    seen = [v for v in losses if v is not None]
    span = (seen[0] - seen[-1]) if seen else 0
    history = []
    for i, loss in enumerate(losses):
        history.append({"step": i + 1, "examples_seen": (i + 1) * BS, "train_loss": loss,
                        "train_loss_ema": smooth_[i] if smooth_ else None, "grad_norm": 1.0, "lr": 1e-4, "l0": L0})
    points = [i for i in range(len(losses)) if (i + 1) % 4 == 0]
    for k, i in enumerate(points):
        if evals is not None:
            history[i]["eval_loss"] = evals[k]
        elif final_eval is not None and losses[i] is not None:
            share = (losses[i] - seen[-1]) / span if span > 0 else 0.0
            history[i]["eval_loss"] = final_eval + (L0 - final_eval) * min(max(share, 0.0), 1.0)
    final = {**(history[-1] if history else {}), "l0": L0, "status": status, "reason": reason}
    if done:
        final["done"] = True
    if final_eval is not None:
        final["eval_loss"] = final_eval
        if history:
            history[-1]["eval_loss"] = final_eval
    return TrialRecord(trial_id="t0", config={"method": "full", "learning_rate": 1e-4, "batch_size": BS},
                       history=history, final=final, stopped_by=stopped_by, error=error)


def _gain(final_eval: float) -> float:
    return (L0 - final_eval) / L0


# --- one test per class ---------------------------------------------------------------------------


def test_converged_curve_is_converged_with_final_eval_and_l0_in_evidence():
    outcome, evidence = classify(_record(_decay(), final_eval=1.2), best_gain=_gain(1.2))
    assert outcome == "converged"
    assert "1.200" in evidence and "3.000" in evidence and "60%" in evidence


def test_slow_curve_with_small_gain_is_slow_against_its_methods_best():
    best = _record(_decay(), final_eval=1.2)
    slow = _record([3.0 - 0.015 * i for i in range(40)], final_eval=2.55)
    classify_all([best, slow])
    assert (best.outcome, slow.outcome) == ("converged", "slow")
    assert "gained 15% of l0" in slow.evidence and "best (60%)" in slow.evidence


def test_loss_spikes_in_last_quarter_make_the_curve_oscillating():
    losses = _decay()
    for i in (31, 34, 37):
        losses[i] = 4.0
    outcome, evidence = classify(_record(losses), best_gain=_gain(1.2))
    assert outcome == "oscillating"
    assert evidence.startswith("3 loss spikes") and "256 examples" in evidence


def test_loss_jump_makes_the_curve_diverged():
    losses = _decay()
    losses[-1] = 30.5  # > 10x the first (largest) loss, 3.0
    outcome, evidence = classify(_record(losses), best_gain=_gain(1.2))
    assert outcome == "diverged"
    assert "30.5" in evidence and "10x" in evidence and "320 examples" in evidence


def test_stopped_by_the_pruning_rule_is_pruned_with_the_rule_as_evidence():
    record = _record(_decay(8), final_eval=None, done=False, stopped_by="pruned: median at 64 examples")
    assert classify(record, best_gain=0.6) == ("pruned", "pruned: median at 64 examples")


def test_trial_process_error_without_history_is_failed_with_the_error_as_evidence():
    error = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    record = TrialRecord(trial_id="t0", config={"method": "full", "learning_rate": 1e-4}, error=error)
    assert classify(record, best_gain=0.6) == ("failed", error)


def test_trainer_status_failed_is_failed_with_its_reason():
    record = _record(_decay(5), final_eval=None, status="failed", reason="out of memory at step 6")
    assert classify(record, best_gain=0.6) == ("failed", "out of memory at step 6")


# --- diverged: every sub-rule ------------------------------------------------------------------------


def _non_finite():
    losses = _decay()
    losses[20] = None  # stored as None: the trainer's NaN/inf
    return _record(losses, final_eval=1.2), "non-finite"


def _smoothed_above_4x():
    losses = _plateau(40, start=20)
    losses[-1] = 4.1  # the smoothed value given as reported; its running minimum is 1.0
    return _record(losses, smooth_=list(losses)), "4.1x its minimum at 320 examples"


def _one_step_above_10x():
    losses = _decay()
    losses[-1] = 30.5
    return _record(losses), "10x the largest before it"


def _trainer_stopped():
    return _record(_decay(10), final_eval=L0, status="diverged", reason="non-finite loss (nan) at step 11"), \
        "non-finite loss (nan) at step 11"


def _sweep_stopped():
    return _record(_decay(10), final_eval=None, done=False,
                   stopped_by="diverged: smoothed loss 4.3x its minimum at 96 examples"), \
        "smoothed loss 4.3x its minimum at 96 examples"


def _pruned_but_rising():
    return _record([2.0 + 0.1 * i for i in range(8)], final_eval=None, done=False,
                   stopped_by="pruned: median at 64 examples"), "train loss rose from 2.00 to 2.70"


@pytest.mark.parametrize("make", [_non_finite, _smoothed_above_4x, _one_step_above_10x,
                                  _trainer_stopped, _sweep_stopped, _pruned_but_rising],
                         ids=lambda f: f.__name__.strip("_"))
def test_diverged_sub_rule_gives_diverged_with_its_numbers(make):
    record, expected = make()
    outcome, evidence = classify(record, best_gain=_gain(1.2))
    assert outcome == "diverged"
    assert expected in evidence


@pytest.mark.parametrize("end, diverged", [(3.99, False), (4.01, True)])
def test_smoothed_loss_diverges_only_above_4x_its_running_minimum(end, diverged):
    losses = _plateau(40, start=20)
    losses[-1] = end
    outcome, _ = classify(_record(losses, smooth_=list(losses)), best_gain=_gain(1.2))
    assert (outcome == "diverged") is diverged


@pytest.mark.parametrize("jump, diverged", [(29.9, False), (30.1, True)])
def test_one_step_diverges_only_above_10x_the_largest_loss_before_it(jump, diverged):
    losses = _decay()  # largest before the jump: 3.0
    losses[-1] = jump
    outcome, _ = classify(_record(losses), best_gain=_gain(1.2))
    assert (outcome == "diverged") is diverged


@pytest.mark.parametrize("factor, diverged", [(4.0, True), (6.0, False)])
def test_the_divergence_factor_comes_from_the_thresholds_the_sweep_gives(factor, diverged):
    losses = _plateau(40, start=20)
    losses[-1] = 5.0  # 5x its running minimum: diverged under the default 4, not under a spec's 6
    record = _record(losses, smooth_=list(losses))
    classify_all([record], Thresholds(factor=factor))
    assert (record.outcome == "diverged") is diverged


@pytest.mark.parametrize("spike, diverged", [(10.0, True), (20.0, False)])
def test_the_spike_factor_comes_from_the_thresholds_the_sweep_gives(spike, diverged):
    losses = _decay()
    losses[-1] = 45.0  # 15x the largest loss before it
    outcome, _ = classify(_record(losses), best_gain=_gain(1.2), thresholds=Thresholds(spike=spike, factor=100))
    assert (outcome == "diverged") is diverged


@pytest.mark.parametrize("ratio, diverged", [(1.29, False), (1.31, True)])
def test_pruned_curve_is_diverged_only_when_it_rose_above_1_3x_its_first_loss(ratio, diverged):
    losses = [2.0] * 7 + [2.0 * ratio]
    record = _record(losses, final_eval=None, done=False, stopped_by="pruned: median at 64 examples")
    outcome, _ = classify(record, best_gain=0.6)
    assert outcome == ("diverged" if diverged else "pruned")


# --- oscillating: every sub-rule ---------------------------------------------------------------------

SPIKES = (92, 101, 110)  # in the last quarter of 120 reports, 9 apart: each window of 8 is plain plateau


def _spiky(level, height: float, at=SPIKES) -> list[float]:
    losses = _plateau(120, level)
    for i in at:
        losses[i] = height
    return losses


@pytest.mark.parametrize("at, oscillating", [(SPIKES[:2], False), (SPIKES, True)])
def test_oscillating_needs_at_least_3_spikes_in_the_last_quarter(at, oscillating):
    outcome, _ = classify(_record(_spiky(lambda i: 1.0, 3.0, at)), best_gain=_gain(1.2))
    assert outcome == ("oscillating" if oscillating else "converged")


@pytest.mark.parametrize("height, oscillating", [(1.99, False), (2.0, True)])
def test_spike_is_a_loss_at_least_2x_the_mean_of_its_window(height, oscillating):
    outcome, evidence = classify(_record(_spiky(lambda i: 1.0, height)), best_gain=_gain(1.2))
    assert outcome == ("oscillating" if oscillating else "converged")
    if oscillating:
        assert "3 loss spikes" in evidence and f"{(SPIKES[0] + 1) * BS} examples" in evidence


@pytest.mark.parametrize("sigmas, oscillating", [(5.5, False), (6.5, True)])
def test_spike_is_a_loss_above_mean_plus_6_sigma_of_its_window(sigmas, oscillating):
    # plateau alternating 1.0 / 1.1: window mean 1.05, sigma 0.05; the spikes stay far below 2x the mean
    losses = _spiky(lambda i: 1.0 if i % 2 else 1.1, 1.05 + sigmas * 0.05)
    outcome, _ = classify(_record(losses), best_gain=_gain(1.2))
    assert outcome == ("oscillating" if oscillating else "converged")


def _rebound(end: float) -> list[float]:
    """Smoothed loss down to 1.0 at report 21, flat to report 30, then rising steadily to ``end``."""
    return _plateau(30, start=20) + [1.0 + (end - 1.0) * k / 10 for k in range(1, 11)]


def test_smoothed_loss_ending_above_its_minimum_is_oscillating_with_the_ratio():
    losses = _rebound(1.15)
    outcome, evidence = classify(_record(losses, smooth_=list(losses)), best_gain=_gain(1.2))
    assert outcome == "oscillating"
    assert "1.15x its minimum" in evidence and "168 examples" in evidence


@pytest.mark.parametrize("end, oscillating", [(1.09, False), (1.11, True)])
def test_rebound_counts_only_above_1_1x_the_minimum(end, oscillating):
    losses = _rebound(end)
    outcome, _ = classify(_record(losses, smooth_=list(losses)), best_gain=_gain(1.2))
    assert outcome == ("oscillating" if oscillating else "converged")


# --- overfit / mismatch: the training loss fell, the held-out loss rose -----------------------------


def _overfit(rise: float) -> TrialRecord:
    """Train loss falls 3.0 -> 1.0; held-out loss falls 3.0 -> 1.5 by report 20, then ends ``rise`` x that minimum."""
    evals = [2.5, 2.0, 1.7, 1.5] + [1.5 * (1 + (rise - 1) * k / 6) for k in range(1, 7)]
    return _record(_decay(), final_eval=evals[-1], evals=evals)


def test_held_out_loss_rising_after_its_minimum_while_train_loss_fell_is_overfit_not_diverged():
    outcome, evidence = classify(_overfit(1.3), best_gain=_gain(1.2))
    assert outcome == "overfit"
    assert "overfitting" in evidence and "1.500 at 128 examples" in evidence and "1.950" in evidence


@pytest.mark.parametrize("rise, overfit", [(1.04, False), (1.06, True)])
def test_overfit_needs_the_held_out_loss_to_end_over_5pct_above_its_minimum(rise, overfit):
    outcome, _ = classify(_overfit(rise), best_gain=_gain(1.2))
    assert outcome == ("overfit" if overfit else "converged")


def test_held_out_loss_that_never_went_below_l0_while_train_loss_fell_is_a_mismatch():
    evals = [3.05 + 0.05 * k for k in range(10)]  # rises from the start: the training data does not transfer
    outcome, evidence = classify(_record(_decay(), final_eval=evals[-1], evals=evals), best_gain=0.6)
    assert outcome == "overfit"
    assert "mismatch" in evidence and "never went below the base model's (3.000)" in evidence


@pytest.mark.parametrize("final_eval, outcome", [(L0 - 0.001, "slow"), (L0, "overfit")])
def test_a_final_held_out_loss_at_or_above_l0_after_the_train_loss_fell_is_overfit(final_eval, outcome):
    assert classify(_record(_decay(), final_eval=final_eval), best_gain=0.6)[0] == outcome


@pytest.mark.parametrize("drop, outcome", [(0.09, "slow"), (0.11, "overfit")])
def test_overfit_needs_the_train_loss_to_have_fallen_by_10pct(drop, outcome):
    losses = [3.0] + [3.0 * (1 - drop)] * 29  # the last third's mean sits ``drop`` below the first loss
    record = _record(losses, smooth_=list(losses), final_eval=L0 + 0.2)
    assert classify(record, best_gain=0.6)[0] == outcome


# --- slow: too little learned, whatever the shape of a short curve ----------------------------------


@pytest.mark.parametrize("gain, slow", [(0.101, False), (0.099, True)])
def test_slow_below_10pct_of_l0_even_when_it_is_the_methods_best(gain, slow):
    outcome, evidence = classify(_record(_decay(8), final_eval=L0 * (1 - gain)), best_gain=gain)
    assert outcome == ("slow" if slow else "converged")
    if slow:
        assert "gained 10% of l0 (< 10%)" in evidence and "too low" in evidence


@pytest.mark.parametrize("gain, slow", [(0.201, False), (0.199, True)])
def test_slow_below_a_third_of_the_methods_best_gain(gain, slow):
    outcome, evidence = classify(_record(_decay(8), final_eval=L0 * (1 - gain)), best_gain=0.6)
    assert outcome == ("slow" if slow else "converged")
    if slow:
        assert "its method's best (60%)" in evidence


def test_a_flat_short_curve_that_gained_almost_nothing_is_slow_not_converged():
    losses = [3.0, 2.99, 2.98, 2.98, 2.97, 2.97, 2.96, 2.96]  # 8 points: never 'clearly falling'
    assert classify(_record(losses, final_eval=2.95), best_gain=0.6)[0] == "slow"


def test_the_best_gain_is_per_method():
    full = _record(_decay(), final_eval=0.6)  # gains 80%
    lora = _record(_decay(), final_eval=2.1)  # gains 30%: slow against full's 80%, but it is lora's best
    lora.config = {**lora.config, "method": "lora"}
    classify_all([full, lora])
    assert (full.outcome, lora.outcome) == ("converged", "converged")


def test_classify_all_ignores_failed_trials_when_taking_the_best_gain():
    failed = _record(_decay(), final_eval=0.3, status="failed", reason="out of memory at step 41")
    best = _record(_decay(), final_eval=1.2)
    # gain 22%: below a third of the failed trial's 90%, above a third of the best finished trial's 60%
    behind = _record([3.0 - 0.015 * i for i in range(40)], final_eval=2.35)
    classify_all([failed, best, behind])
    assert [r.outcome for r in (failed, best, behind)] == ["failed", "converged", "converged"]


def test_a_trial_interrupted_while_it_ran_is_unfinished_not_converged():
    record = _record(_decay(6), final_eval=None, done=False)
    outcome, evidence = classify(record, best_gain=None)
    assert outcome == "unfinished" and "--resume" in evidence and "at 48 examples" in evidence


def test_a_pruned_trial_whose_held_out_loss_was_worse_than_l0_is_pruned_not_diverged():
    # divergence is a property of the training loss: this one fell; only the held-out loss was above l0
    record = _record([5.0, 4.8, 4.6, 4.5], final_eval=None, done=False, stopped_by="pruned: median at 32 examples")
    record.history[-1]["eval_loss"] = L0 + 0.5
    assert classify(record, best_gain=None) == ("pruned", "pruned: median at 32 examples")


@pytest.mark.parametrize("peak, outcome", [(3.9, "pruned"), (4.1, "diverged")])
def test_a_pruned_curve_whose_raw_loss_rose_past_factor_times_its_minimum_is_diverged(peak, outcome):
    losses = [6.0, 5.0, 7.5, 5.0 * peak, 12.0, 10.0, 9.0, 6.0]  # blew up, then came partly back: not just behind
    record = _record(losses, final_eval=None, done=False, stopped_by="pruned: median at 64 examples")
    got, evidence = classify(record, best_gain=0.6)
    assert got == outcome
    if outcome == "diverged":
        assert f"{5.0 * peak:.2f}, 4.1x its minimum before (5.00), at 32 examples" in evidence
