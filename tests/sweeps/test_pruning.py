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


# --- the bridge on a multi-objective study (real Optuna, Ray's OptunaSearch; no trial runs) ----------------


def _bridge(tmp_path, pruning: str):
    import optuna

    from sweeps.pruning import PruningSearch, make_pruner
    from sweeps.space import DefineByRun, make_sampler
    from sweeps.spec import load_spec

    spec_file = tmp_path / "mo.yaml"
    spec_file.write_text("name: mo\nmodel: tiny\nsearch: {algorithm: tpe, metric: [eval_loss, forgetting], "
                         "mode: [min, min], n_trials: 8}\nspace:\n  method: [full]\n"
                         f"  learning_rate: {{low: 1.0e-4, high: 1.0e-2, log: true}}\npruning: {pruning}\n")
    spec = load_spec(spec_file)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    bridge = PruningSearch(spec, space=DefineByRun(spec), sampler=make_sampler(spec), storage=storage,
                           pruner=make_pruner(spec.pruning, 8, 64), stops_file=tmp_path / "stops.jsonl", report_every=8)
    return bridge, lambda: optuna.load_study(study_name="mo", storage=storage)


def _run(bridge, trial_id: str, curve: list[float], final: dict) -> str | None:
    """Feed the curve one report at a time as Ray would; the stop reason, or None if it ran to the end."""
    config = bridge.suggest(trial_id)
    for i, loss in enumerate(curve, 1):
        if bridge(trial_id, {"examples_seen": 8 * i, "train_loss": loss, "train_loss_ema": loss, "grad_norm": 1.0,
                             "config": config}):
            bridge.on_trial_complete(trial_id, {"status": "completed", "objective_eval_loss": loss})
            return bridge.stop_reason(trial_id)
    bridge.on_trial_complete(trial_id, final)
    return None


def test_a_named_median_rule_prunes_a_multi_objective_study_on_the_primary_curve(tmp_path):
    from optuna.trial import TrialState

    bridge, study = _bridge(tmp_path, "{rule: median, startup_trials: 2, warmup_reports: 1}")
    done = {"status": "completed", "objective_eval_loss": 1.0, "objective_forgetting": 0.3}
    assert _run(bridge, "a", [3.0, 2.0, 1.0], done) is None
    assert _run(bridge, "b", [3.0, 2.2, 1.1], {**done, "objective_eval_loss": 1.1, "objective_forgetting": 0.1}) is None
    assert _run(bridge, "c", [3.0, 2.9, 2.95], done) == "pruned: median among method trials at 16 examples"
    trials = study().trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[1].values == [1.1, 0.1], "both objectives told to Optuna"
    assert trials[2].intermediate_values == {8: 3.0, 16: 2.9}, "the curve is kept although Trial.report would raise"


def test_the_divergence_rules_stop_a_multi_objective_trial_without_a_pruning_rule(tmp_path):
    from optuna.trial import TrialState

    bridge, study = _bridge(tmp_path, "{rule: none}")
    reason = _run(bridge, "a", [3.0, 2.0, 60.0, 1.0], {})
    assert reason.startswith("diverged:") and "jumped past 10x" in reason
    assert study().trials[0].state == TrialState.PRUNED


def test_the_median_rule_never_stops_a_refinement_trial_but_the_divergence_rules_do(tmp_path):
    bridge, _ = _bridge(tmp_path, "{rule: median, startup_trials: 2, warmup_reports: 1}")
    done = {"status": "completed", "objective_eval_loss": 1.0, "objective_forgetting": 0.3}
    assert _run(bridge, "a", [3.0, 2.0, 1.0], done) is None
    assert _run(bridge, "b", [3.0, 2.2, 1.1], done) is None
    behind = {"examples_seen": 16, "train_loss": 2.9, "train_loss_ema": 2.9, "grad_norm": 1.0}
    bridge.suggest("c")
    bridge("c", {**behind, "examples_seen": 8, "train_loss": 3.0, "train_loss_ema": 3.0, "config": {"refine": 1}})
    assert not bridge("c", {**behind, "config": {"refine": 1}}), "behind the median, but measuring an edge"
    bridge.suggest("d")
    bridge("d", {**behind, "examples_seen": 8, "train_loss": 3.0, "train_loss_ema": 3.0, "config": {}})
    assert bridge("d", {**behind, "config": {}}), "the same curve in the grid is pruned"
    assert bridge("c", {**behind, "examples_seen": 24, "train_loss": 60.0, "config": {"refine": 1}})
    assert bridge.stop_reason("c").startswith("diverged:")
