"""The divergence rules of the pruning bridge, one report at a time (no Ray needed)."""
from __future__ import annotations

import math

import pytest

from sweeps.launch.pruning import DivergenceMonitor


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

    from sweeps.launch.pruning import PruningSearch, make_pruner
    from sweeps.launch.space import DefineByRun, make_sampler
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


# --- the same grid gives the same map: no stop depends on which trials finished first ------------------------------

# (learning rate, train loss per report): one that learns, one that lags behind it (a median rule's target), one
# that blows up at its 4th report
_CURVES = {1e-3: [3.0, 2.0, 1.5, 1.2, 1.0], 1e-4: [3.0, 2.9, 2.85, 2.8, 2.75], 1e-1: [3.0, 2.5, 2.6, 40.0, 60.0]}


def _grid_bridge(tmp_path, algorithm: str, extra: str = ""):
    import optuna

    from sweeps.launch.pruning import PruningSearch, make_pruner
    from sweeps.launch.space import DefineByRun, GridSpace, make_sampler
    from sweeps.spec import load_spec

    tmp_path.mkdir(parents=True, exist_ok=True)
    spec_file = tmp_path / f"{algorithm}.yaml"
    lrs = ", ".join(f"{lr:.1e}" for lr in _CURVES)
    spec_file.write_text(f"name: order\nmodel: tiny\nsearch: {{algorithm: {algorithm}, n_trials: 3}}\n"
                         f"space: {{method: [full], learning_rate: [{lrs}]}}\n"
                         f"pruning: {{divergence: {{min_reports: 1}}{extra}}}\n")
    spec = load_spec(spec_file)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    space = GridSpace(spec) if algorithm == "grid" else DefineByRun(spec)
    return PruningSearch(spec, space=space, sampler=make_sampler(spec), storage=storage,
                         pruner=make_pruner(spec.pruning, 8, 40), stops_file=tmp_path / "stops.jsonl", report_every=8)


def _decisions(tmp_path, algorithm: str, finish_order: list[float], extra: str = "") -> dict[float, str | None]:
    """Run the three curves through the bridge, each to its end or its stop, one trial after another in
    ``finish_order`` (which trial finished first is what Ray's timing decides); each LR's stop reason (None: ran out)."""
    bridge = _grid_bridge(tmp_path, algorithm, extra)
    configs = {f"t{i}": bridge.suggest(f"t{i}") for i in range(3)}  # asked in the grid's own order
    by_lr = {c["learning_rate"]: t for t, c in configs.items()}
    if algorithm != "grid":  # a sampler picks its own LRs: give each trial one of the curves in the asked order
        by_lr = dict(zip(_CURVES, configs))
    out = {}
    for lr in finish_order:
        trial = by_lr[lr]
        for i, loss in enumerate(_CURVES[lr], 1):
            result = {"examples_seen": 8 * i, "train_loss": loss, "train_loss_ema": loss, "grad_norm": 1.0,
                      "config": configs[trial]}
            if bridge(trial, result):
                break
        bridge.on_trial_complete(trial, {"status": "completed", "objective": _CURVES[lr][-1]})
        out[lr] = bridge.stop_reason(trial)
    return out


@pytest.mark.parametrize("algorithm", ["grid", "tpe"])
def test_a_resume_whose_saved_state_missed_trials_that_ran_starts_no_extra_one(tmp_path, algorithm):
    """Ray saved the searcher when one trial had started; two more started and all three completed before the
    driver was killed. The resumed Ray knows one trial of three and asks for two more: the study has them all, so
    the searcher says it is finished rather than starting a cell (or a sample) again."""
    import optuna
    from ray.tune.search import Searcher

    bridge = _grid_bridge(tmp_path, algorithm)
    bridge.suggest("t0")
    bridge.save(str(tmp_path / "searcher.pkl"))  # Ray's saved state: one trial
    for trial in ("t0", "t1", "t2"):
        if trial != "t0":
            bridge.suggest(trial)
        bridge.on_trial_complete(trial, {"status": "completed", "objective": 1.0})
    restored = _grid_bridge(tmp_path, algorithm)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("t3") == Searcher.FINISHED
    study = optuna.load_study(study_name="order", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 3


def test_a_grids_stops_do_not_depend_on_which_trials_finished_first(tmp_path):
    """The same grid, its trials finishing in two orders: the same trials stopped, at the same report, for the same
    reason. A grid stops by the divergence rules only (rule none by default), which read one curve each."""
    first = _decisions(tmp_path / "a", "grid", [1e-3, 1e-4, 1e-1])
    second = _decisions(tmp_path / "b", "grid", [1e-1, 1e-4, 1e-3])
    assert first == second
    assert first[1e-1].startswith("diverged:") and "at 32 examples" in first[1e-1]
    assert first[1e-3] is None and first[1e-4] is None, "lagging is not a stop on a map"


def test_the_harness_sees_order_dependence_where_a_median_rule_is_allowed(tmp_path):
    """The same curves in a search (random) with a median rule: the lagging trial is pruned when the good one finished
    before it, not when it ran first. What a grid must not do, and the harness above would catch."""
    median = ", rule: median, startup_trials: 1, warmup_reports: 0"
    after = _decisions(tmp_path / "a", "random", [1e-3, 1e-4, 1e-1], median)
    before = _decisions(tmp_path / "b", "random", [1e-4, 1e-3, 1e-1], median)
    assert after[1e-4] and after[1e-4].startswith("pruned: median")
    assert before[1e-4] is None


@pytest.mark.parametrize("spec, message", [
    ("search: {algorithm: grid}\npruning: {rule: median}", "pruning.rule: median on a grid"),
    ("search: {algorithm: grid, max_concurrent: 2}\npruning: {rule: successive_halving}", "successive_halving on a grid"),
])
def test_a_grid_with_an_order_dependent_rule_run_side_by_side_is_refused(tmp_path, spec, message):
    from sweeps.spec import load_spec
    from trainer.errors import UserError

    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nmodel: tiny\nspace: {{learning_rate: [0.001, 0.01]}}\n{spec}\n")
    with pytest.raises(UserError, match=message):
        load_spec(path)
    path.write_text(path.read_text().replace("algorithm: grid", "algorithm: grid, max_concurrent: 1")
                    .replace(", max_concurrent: 2", ""))
    assert load_spec(path).pruning.rule != "none", "one trial at a time, the cells before are always the same"
    path.write_text("name: s\nmodel: tiny\nspace: {learning_rate: [0.001, 0.01]}\nsearch: {algorithm: grid}\n")
    assert load_spec(path).pruning.rule == "none", "a grid's default"


@pytest.mark.slow
def test_the_same_grid_run_one_at_a_time_and_side_by_side_maps_every_cell_the_same(tmp_path, tiny_model_dir):
    """A real sweep of the tiny model, twice: one trial at a time, then two side by side (other trials finish first).
    Every cell gets the same outcome and the same stop."""
    import json

    from tests.conftest import run_cli

    spec = tmp_path / "order.yaml"
    spec.write_text(f"""name: order
model: tiny
data: {{train: "builtin:facts:16", eval: "builtin:facts-heldout:16"}}
train: {{epochs: 2, batch_size: 4, seq_len: 48, report_every: 4, eval_every: 16, memorization: false, forgetting: false}}
search: {{algorithm: grid}}
space: {{method: [full, lora], learning_rate: [1.0e-3, 3.0e-2, 3.0]}}
pruning: {{divergence: {{min_reports: 2}}}}
failure: {{max_retries: 0, checkpoint_every: 0}}
output_dir: {tmp_path / 'out'}
""")
    maps = []
    for name, concurrent in (("one", 1), ("two", 2)):
        proc = run_cli(["sweeps/run.py", str(spec), f"name={name}", f"search.max_concurrent={concurrent}"], timeout=900,
                       env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        trials = json.loads((tmp_path / "out" / name / "trials.json").read_text())
        maps.append({(t["config"]["method"], t["config"]["learning_rate"]): (t["outcome"], t["stopped_by"]) for t in trials})
    assert len(maps[0]) == 6 and maps[0] == maps[1]
    assert maps[0][("full", 3.0)][0] == "diverged"
