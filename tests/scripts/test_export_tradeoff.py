"""export_best on a sweep whose best trial forgets a lot: --max-forgetting, --pareto, the plain export's
warning, the rule in provenance, and exported files that load in transformers and peft.

Fast: a synthetic sweep folder (spec.json + trials.json, the tiny model's settings); the export runs as a
user runs it, in a subprocess; nothing trains.

    python -m pytest -q tests/scripts/test_export_tradeoff.py
"""
from __future__ import annotations

import json
import math

import pytest

from sweeps.results.records import save_records
from sweeps.spec import SweepSpec
from tests.conftest import run_cli
from tests.sweeps.test_report import _converged, _diverged

# (method, lr, held-out loss, forgetting): the shape of issue 14's lr.yaml table
TRIALS = {"A": ("full", 1e-3, 1.0, 1.9), "B": ("full", 1e-4, 2.0, 0.13), "C": ("lora", 1e-3, 2.5, 0.07),
          "D": ("lora", 1e-2, 1.2, 2.1)}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tradeoff") / "tradeoff"
    folder.mkdir()
    spec = SweepSpec.model_validate({
        "name": "tradeoff", "model": "tiny", "data": {"train": "builtin:facts:16", "eval": "builtin:facts-heldout:16"},
        "train": {"epochs": 2, "batch_size": 4, "warmup_ratio": 0.1, "seq_len": 48},
        "space": {"method": ["full", "lora"], "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}})
    (folder / "spec.json").write_text(json.dumps({"digest": spec.digest(), "spec": spec.model_dump(mode="json")}))
    records = []
    for name, (method, lr, loss, forgetting) in TRIALS.items():
        r = _converged(method, lr, 4, loss)
        r.trial_id, r.final["forgetting"], r.objective = name, forgetting, loss
        r.final["status"], r.config["epochs"] = "completed", 2.0
        records.append(r)
    stopped = _diverged("full", 1e-2, 4)
    stopped.trial_id = "E"
    save_records(records + [stopped], folder / "trials.json")
    return folder


def _export(sweep, out, *args):
    return run_cli(["-m", "sweeps.cli", "export", str(sweep), "--out", str(out), *args], timeout=180)


def test_max_forgetting_exports_the_lowest_loss_within_the_budget_and_records_the_rule(sweep, tmp_path):
    proc = _export(sweep, tmp_path, "--max-forgetting", "0.5")
    assert proc.returncode == 0, proc.stderr
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["trial_id"] == "B" and prov["forgetting"] == 0.13
    assert prov["rule"] == ("lowest objective among completed trials whose forgetting (reference-text NLL change) "
                            "is <= 0.5 nats")
    assert "warning" not in proc.stderr


def test_a_plain_export_warns_when_the_best_forgets_over_half_a_nat_and_names_the_best_within(sweep, tmp_path):
    proc = _export(sweep, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "provenance.json").read_text())["trial_id"] == "A"
    assert (f"warning: trial A forgets +1.90 nats on the reference text: its perplexity there is "
            f"{math.exp(1.9):.1f}x the base model's") in proc.stderr
    assert "The best trial within 0.5 nats is B (full lr 1e-4 bs 4 epochs 2, held-out loss 2.000" in proc.stderr
    assert "--max-forgetting 0.5" in proc.stderr


def test_a_budget_no_trial_fits_exits_2_with_the_least_forgetting_and_writes_nothing(sweep, tmp_path):
    proc = _export(sweep, tmp_path / "out", "--max-forgetting", "0.01")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("--max-forgetting 0.01: no completed trial forgot 0.01 nats or less; the least was trial C "
            "(lora lr 1e-3 bs 4 epochs 2, held-out loss 2.500, forgetting +0.07)") in proc.stderr
    assert not (tmp_path / "out").exists()


def test_pareto_prints_the_front_and_exports_nothing(sweep, tmp_path):
    proc = _export(sweep, tmp_path / "out", "--pareto")
    assert proc.returncode == 0, proc.stderr
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln[:1] in TRIALS]
    assert [r[0] for r in rows] == ["A", "B", "C"], proc.stdout  # D (1.2, +2.1) is beaten by A on both
    assert rows[0][-3:] == ["1.0000", "+1.900", f"{math.exp(1.9):.2f}x"]
    assert not (tmp_path / "out").exists()


def test_exported_files_build_the_real_training_arguments_and_lora_config(sweep, tmp_path):
    from peft import LoraConfig
    from transformers import TrainingArguments

    proc = _export(sweep, tmp_path, "--method", "lora")
    assert proc.returncode == 0, proc.stderr
    hf = json.loads((tmp_path / "hf_training_args.json").read_text())
    args = TrainingArguments(**hf)
    steps = math.ceil(2 * 16 / 4)  # 2 epochs of 16 records, batch 4: the trainer's own count
    assert args.warmup_steps == round(0.1 * steps) and args.learning_rate == 1e-2 and not args.logging_nan_inf_filter
    lora = LoraConfig(**json.loads((tmp_path / "lora_config.json").read_text()))
    assert lora.r == 8 and lora.target_modules == "all-linear"
    n_epochs = json.loads((tmp_path / "openai.json").read_text())["hyperparameters"]["n_epochs"]
    assert n_epochs == 2 and isinstance(n_epochs, int)
