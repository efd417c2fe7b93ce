"""The divergence rules of the pruning bridge, one report at a time (no Ray needed)."""
from __future__ import annotations

import math

from sweeps.pruning import DivergenceMonitor


def _feed(monitor: DivergenceMonitor, losses: list[float]) -> tuple[int | None, str | None]:
    """The report (from 1) at which the monitor stops the trial, and why."""
    for i, loss in enumerate(losses, 1):
        reason = monitor.update({"examples_seen": 8 * i, "train_loss": loss, "train_loss_ema": loss, "grad_norm": 1.0})
        if reason:
            return i, reason
    return None, None


def test_a_spike_stops_the_trial_at_the_report_that_shows_it():
    at, reason = _feed(DivergenceMonitor(factor=4, spike=10, min_reports=1), [5.0, 4.0, 60.0, 3.0])
    assert at == 3 and "jumped past 10x" in reason and "at 24 examples" in reason


def test_a_spike_before_min_reports_stops_the_trial_at_min_reports_under_its_first_reason():
    at, reason = _feed(DivergenceMonitor(factor=4, spike=10, min_reports=5), [5.0, 60.0, 70.0, 80.0, 90.0, 99.0])
    assert at == 5 and "jumped past 10x" in reason and "at 16 examples" in reason


def test_a_trial_that_recovers_before_min_reports_is_still_stopped():
    at, _ = _feed(DivergenceMonitor(factor=4, spike=10, min_reports=4), [5.0, 60.0, 4.0, 3.0, 2.0])
    assert at == 4  # a 10x jump is divergence even if the loss came back: the run is not trustworthy


def test_the_smoothed_loss_factor_rule_fires_past_factor_times_its_minimum():
    assert _feed(DivergenceMonitor(factor=4, spike=100, min_reports=1), [5.0, 2.0, 7.9])[0] is None
    at, reason = _feed(DivergenceMonitor(factor=4, spike=100, min_reports=1), [5.0, 2.0, 8.1])
    assert at == 3 and "4.0x its minimum" in reason


def test_a_non_finite_loss_stops_at_once_whatever_min_reports():
    at, reason = _feed(DivergenceMonitor(factor=4, spike=10, min_reports=5), [5.0, math.nan])
    assert at == 2 and "non-finite loss at 16 examples" in reason


def test_a_healthy_curve_is_never_stopped():
    assert _feed(DivergenceMonitor(factor=4, spike=10, min_reports=2), [5.0, 4.0, 3.5, 3.6, 3.0, 2.5]) == (None, None)
