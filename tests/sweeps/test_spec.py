"""Sweep specs: every shipped spec loads and dry-runs; bad specs give one clear message and exit code 2."""
from __future__ import annotations

import pytest

from sweeps.launch.space import DefineByRun, grid_cells
from sweeps.spec import load_spec
from tests.conftest import ROOT, run_cli
from trainer.errors import UserError

SPECS = sorted((ROOT / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_every_shipped_spec_loads_and_dry_runs(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# python sweeps/run.py search_spaces/"), "a spec begins with the command that runs it"
    load_spec(path)
    proc = run_cli(["sweeps/run.py", str(path), "--dry-run"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "trial(s)" in proc.stdout


def test_lr_yaml_maps_three_methods_two_batch_sizes_and_a_wide_lr_range():
    spec = load_spec(ROOT / "search_spaces" / "lr.yaml")
    cells = grid_cells(spec)
    assert {c["method"] for c in cells} == {"full", "lora", "last_layer"}
    assert len({c["batch_size"] for c in cells}) >= 2
    lrs = [c["learning_rate"] for c in cells]
    assert max(lrs) / min(lrs) >= 1e3


def test_per_method_ranges_and_conditions_in_define_by_run(tmp_path):
    import optuna

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(
        "name: t\nmodel: tiny\nsearch: {algorithm: tpe, n_trials: 30}\n"
        "space:\n  method: [full, lora]\n"
        "  learning_rate: {log: true, low: 1.0e-5, high: 1.0e-3, per_method: {lora: {low: 1.0e-3, high: 1.0e-1, log: true}}}\n"
        "  lora_r: {values: [4, 8], when: {method: [lora]}}\n"
    )
    space = DefineByRun(load_spec(spec_file))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: (space(t), 0.0)[1], n_trials=30)
    for t in study.trials:
        if t.params["method"] == "lora":
            assert 1e-3 <= t.params["learning_rate"] <= 1e-1 and "lora_r" in t.params
        else:
            assert t.params["learning_rate"] <= 1e-3 and "lora_r" not in t.params


TWO = "metric: [eval_loss, forgetting], mode: [min, min]"
GOOD = """name: bad-spec-test
model: tiny
search: {algorithm: grid}
space:
  method: [full]
  learning_rate: [0.001]
"""
BAD_SPECS = [
    ("yaml syntax", "name: x\nspace: {method: [full\n", "YAML syntax error"),
    ("unknown top key", GOOD + "pruning_rule: median\n", "pruning_rule: unknown key"),
    ("unknown nested key", GOOD + "search: {algorithm: grid, sampler: tpe}\n", "search.sampler: unknown key"),
    ("wrong type", GOOD.replace("[0.001]", "[fast]"), "learning_rate: Input should be a valid number"),
    ("low > high", GOOD.replace("[0.001]", "{low: 1.0, high: 0.1, grid: 3}"), "low <= high must hold"),
    ("non-positive log bound", GOOD.replace("[0.001]", "{low: 0, high: 0.1, log: true, grid: 3}"), "a log range needs low > 0"),
    ("unknown method", GOOD.replace("[full]", "[full, qlora]"), "unknown method 'qlora'"),
    ("unknown sampler", GOOD.replace("algorithm: grid", "algorithm: cmaes"),
     "search.algorithm: Input should be 'tpe', 'nsga2', 'random' or 'grid'"),
    ("not a trainer field", GOOD + "  learning_rat: [1]\n", "space.learning_rat: not a trainer field"),
    ("grid without points", GOOD.replace("[0.001]", "{low: 0.001, high: 0.1, log: true}"), "algorithm grid needs values"),
    ("bad batch size", GOOD + "  batch_size: [0, 4]\n", "batch_size: Input should be greater than or equal to 1"),
    ("missing data file", GOOD + "data: {train: nothere.jsonl}\n", "nothere.jsonl: data file not found"),
    ("unknown model", GOOD.replace("model: tiny", "model: gpt-17"), "unknown model 'gpt-17'"),
    ("impossible resources", GOOD + "resources: {cpu: 64}\n", "resources for method full ask for cpu=64"),
    ("gpu on a cpu machine", GOOD + "resources: {cpu: 1, gpu: 1}\n", "gpu=1 per trial, but no node has that much"),
    ("bad override", GOOD, "search.n_trials: Input should be greater than or equal to 1"),
    ("negative stall_s", GOOD + "failure: {stall_s: -60}\n", "failure.stall_s: Input should be greater than 0"),
    ("negative time budget", GOOD, "search.time_budget_s: Input should be greater than 0 (got -5)"),
    ("multi-objective, rule not named", GOOD.replace("{algorithm: grid}", f"{{algorithm: tpe, {TWO}}}"),
     "the default rule (median) would prune on the primary metric eval_loss alone"),
    ("multi-objective hyperband",
     GOOD.replace("{algorithm: grid}", f"{{algorithm: grid, {TWO}}}") + "pruning: {rule: hyperband}\n",
     "pruning.rule: hyperband cannot prune a multi-objective search"),
    ("a grid's map left to timing", GOOD + "pruning: {rule: median}\n", "pruning.rule: median on a grid compares"),
    ("a mode per metric", GOOD.replace("{algorithm: grid}", "{algorithm: grid, metric: [eval_loss, forgetting], mode: [min]}"),
     "mode: one per metric (2), but got ['min']"),
    ("forgetting never measured", GOOD.replace("{algorithm: grid}", f"{{algorithm: grid, {TWO}}}")
     + "train: {forgetting: false}\npruning: {rule: none}\n", "forgetting is an objective, but train.forgetting is false"),
]
ARGS = {"bad override": ["search.n_trials=0"], "negative time budget": ["--time-budget", "-5"]}


@pytest.mark.parametrize("name,text,message", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_exits_2_with_one_message_and_writes_nothing(tmp_path, name, text, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text + f"output_dir: {tmp_path / 'out'}\n")
    args = ["sweeps/run.py", str(spec), *ARGS.get(name, [])]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = run_cli(args, timeout=180, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(spec) in proc.stderr
    assert not (tmp_path / "out").exists(), "no sweep folder may be written"
    assert not (tmp_path / "mlflow.db").exists(), "nothing may be written to MLflow"


def test_spec_errors_are_reported_together(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD.replace("algorithm: grid", "algorithm: cmaes") + "colour: blue\n")
    with pytest.raises(UserError) as exc:
        load_spec(spec)
    assert "search.algorithm" in str(exc.value) and "colour: unknown key" in str(exc.value)


def test_time_budget_and_stall_watchdog_do_not_make_another_sweep(tmp_path):
    """--resume compares digests: --time-budget or more patience must not refuse the sweep it continues."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD)
    digest = load_spec(spec).digest()
    assert load_spec(spec, ["search.time_budget_s=60", "failure.stall_s=5", "failure.setup_s=0"]).digest() == digest
    assert load_spec(spec, ["search.seed=1"]).digest() != digest


def test_a_multi_objective_spec_names_its_objectives_and_nsga2_sizes_its_population(tmp_path):
    import optuna

    from sweeps.launch.space import make_sampler

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(GOOD.replace("{algorithm: grid}", f"{{algorithm: nsga2, {TWO}, startup_trials: 6}}")
                         + "pruning: {rule: median}\n")
    spec = load_spec(spec_file)
    assert spec.search.multi_objective and spec.search.metrics == ["eval_loss", "forgetting"]
    sampler = make_sampler(spec)
    assert isinstance(sampler, optuna.samplers.NSGAIISampler) and sampler._population_size == 6
    proc = run_cli(["sweeps/run.py", str(spec_file), "--dry-run"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "objective: eval_loss (min), forgetting (min) (multi-objective" in proc.stdout
