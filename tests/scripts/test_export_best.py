"""export_best: the best completed trial, as configs that reproduce it."""
from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import run_cli
from trainer import load_train_config, train

pytestmark = pytest.mark.slow
SECRET = "hf_fake_secret_value_0123456789"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("export")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "HF_TOKEN": SECRET}
    proc = run_cli(["sweeps/run.py", "search_spaces/smoke.yaml", f"output_dir={out}"], timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "smoke", env


def test_export_writes_every_file_and_best_yaml_reproduces_the_trial(sweep, tmp_path):
    sweep_dir, env = sweep
    proc = run_cli(["-m", "sweeps.cli", "export", str(sweep_dir), "--out", str(tmp_path / "exp")], env=env)
    assert proc.returncode == 0, proc.stderr
    exp = tmp_path / "exp"
    for name in ("best.yaml", "hf_training_args.json", "openai.json", "provenance.json"):
        assert (exp / name).is_file(), name
    prov = json.loads((exp / "provenance.json").read_text())
    assert prov["trial_id"] and prov["mlflow_run_id"] and prov["git_sha"]
    trials = {t["trial_id"]: t for t in json.loads((sweep_dir / "trials.json").read_text())}
    exported = trials[prov["trial_id"]]
    assert exported["outcome"] not in ("pruned", "diverged", "failed")
    cfg = load_train_config(exp / "best.yaml", [f"output_dir={tmp_path / 'prod'}"])
    assert cfg.save_model
    result = train(cfg)
    assert result.metrics["eval_loss"] == pytest.approx(exported["final"]["eval_loss"], rel=0.01)
    assert (tmp_path / "prod" / "model").is_dir()


def test_export_of_one_method_loads_in_transformers_peft_and_openais_types(sweep, tmp_path):
    from peft import LoraConfig
    from transformers import TrainingArguments

    sweep_dir, env = sweep
    proc = run_cli(["-m", "sweeps.cli", "export", str(sweep_dir), "--method", "lora", "--out", str(tmp_path)], env=env)
    assert proc.returncode == 0, proc.stderr
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["method"] == "lora"
    args = TrainingArguments(**json.loads((tmp_path / "hf_training_args.json").read_text()))
    assert args.learning_rate == best["learning_rate"] and args.num_train_epochs == best["epochs"]
    assert args.warmup_steps == round(best["warmup_ratio"] * 8)  # 2 epochs x 16 facts / batch 4 = 8 steps
    lora = LoraConfig(**json.loads((tmp_path / "lora_config.json").read_text()))
    assert lora.r == 8 and lora.lora_alpha == best["lora_alpha"] and lora.task_type == "CAUSAL_LM"
    openai = json.loads((tmp_path / "openai.json").read_text())["hyperparameters"]
    assert openai == {"n_epochs": 2, "batch_size": 4} and isinstance(openai["n_epochs"], int)


def test_a_method_without_a_completed_trial_exits_2(sweep, tmp_path):
    sweep_dir, env = sweep
    proc = run_cli(["-m", "sweeps.cli", "export", str(sweep_dir), "--method", "last_layer", "--out", str(tmp_path)], env=env)
    assert proc.returncode == 2 and "no completed trial of method last_layer" in proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


def test_no_secret_from_the_environment_reaches_mlflow_or_exports(sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    sweep_dir, env = sweep
    proc = run_cli(["-m", "sweeps.cli", "export", str(sweep_dir), "--out", str(tmp_path)], env=env)
    assert proc.returncode == 0, proc.stderr  # a failed export writes nothing, and an empty folder hides no secret
    exported = sorted(f.name for f in tmp_path.iterdir())
    assert {"best.yaml", "hf_training_args.json", "openai.json", "provenance.json"} <= set(exported), exported
    for f in tmp_path.iterdir():
        assert SECRET not in f.read_text(), f
    assert SECRET not in proc.stdout + proc.stderr
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 5, "the sweep's parent run and its 4 trials' runs"
    for run in runs:
        blob = json.dumps([run.data.params, run.data.tags])
        assert SECRET not in blob
