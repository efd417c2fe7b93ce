"""End-to-end: every registered method fine-tunes the tiny model, writes its outputs, and reloads."""
from __future__ import annotations

import json

import pytest
import torch

from trainer import TrainConfig, train
from trainer.methods import METHODS
from trainer.metrics import evaluate
from trainer.outputs import load_finetuned


def _cfg(method: str, out, **kw) -> TrainConfig:
    base = dict(model="tiny", method=method, learning_rate=3e-3, epochs=2, batch_size=4, seq_len=48,
                report_every=8, eval_every=32, output_dir=str(out), lora_r=8)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_writes_outputs_and_reloads(method, tmp_path, tiny_model_dir):
    reports = []
    result = train(_cfg(method, tmp_path), report=lambda m, checkpoint=None: reports.append(m))

    assert result.status == "completed", result.reason
    m = result.metrics
    assert m["eval_loss"] < m["l0"], "the held-out loss must go down"
    assert reports[-1]["done"] is True
    assert [r["examples_seen"] for r in reports] == list(range(8, 65, 8))
    assert 0 < m["trainable_fraction"] <= 1
    for name in ("config.yaml", "metrics.json", "weight_change.csv", "model"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["provenance"]["versions"]["torch"] == torch.__version__
    assert len(saved["history"]) == len(reports)

    model, tokenizer, cfg = load_finetuned(tmp_path)
    from trainer.data import read_examples, tokenize

    eval_ex = tokenize(read_examples(cfg.eval_data), tokenizer, cfg.seq_len)
    again = evaluate(model, eval_ex, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                     batch_size=16, device="cpu")
    assert again["loss"] == pytest.approx(m["eval_loss"], rel=1e-4)


def test_trainable_parts_match_the_method_docs(tiny_model_dir):
    from trainer.methods import get_method, trainable_summary
    from trainer.models import load_model

    def trained(method: str) -> set[str]:
        model, _ = load_model("tiny")
        model = get_method(method).prepare(model, TrainConfig(model="tiny", method=method))
        return {n for n, p in model.named_parameters() if p.requires_grad}

    last = trained("last_layer")
    assert last and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in last)
    assert "model.embed_tokens.weight" not in last  # the tied head is not trained by last_layer
    assert all("lora_" in n for n in trained("lora"))
    model, _ = load_model("tiny")
    assert trainable_summary(model)["trainable_fraction"] == 1.0


def test_lora_weight_change_is_the_merged_delta(tmp_path, tiny_model_dir):
    result = train(_cfg("lora", tmp_path, save_model=False, memorization=False, forgetting=False))
    changed = [r for r in result.weight_change if r["rel_change"] > 0]
    assert changed and all("proj" in r["name"] for r in changed)
    assert all(r["rel_change"] == 0 for r in result.weight_change if "embed" in r["name"] or "norm" in r["name"])


def test_same_seed_same_result(tmp_path, tiny_model_dir):
    a = train(_cfg("full", tmp_path / "a", save_model=False, max_steps=4))
    b = train(_cfg("full", tmp_path / "b", save_model=False, max_steps=4))
    assert a.metrics["eval_loss"] == pytest.approx(b.metrics["eval_loss"], rel=1e-6)
