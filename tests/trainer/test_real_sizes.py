"""The settings that let a model of real size fit: bf16 weights, gradient checkpointing, a 4-bit base (QLoRA),
an 8-bit optimizer, SDPA attention, a weight snapshot of only what trains; and their exports load in HF/peft."""
from __future__ import annotations

import json

import pytest
import torch

from trainer import TrainConfig, train
from trainer.methods import METHODS, get_method


def _cfg(method: str, **kw) -> TrainConfig:
    base = dict(model="tiny", method=method, learning_rate=3e-3, max_steps=4, batch_size=4, seq_len=48,
                report_every=8, eval_every=None, forgetting=False, threads=1)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_weights_with_checkpointing_train_and_are_saved_in_bf16(method, tmp_path, tiny_model_dir):
    result = train(_cfg(method, dtype="bfloat16", gradient_checkpointing=True, output_dir=str(tmp_path)))
    assert result.status == "completed", result.reason
    assert result.metrics["eval_loss"] < result.metrics["l0"]
    assert result.metrics["peak_mem_gib"] > 0
    if not get_method(method).saves_adapter:  # the whole model is saved: in the dtype it trained in
        assert json.loads((tmp_path / "model" / "config.json").read_text())["dtype"] == "bfloat16"


def test_checkpointing_recomputes_the_same_losses(tiny_model_dir):
    plain = train(_cfg("full"))
    ckpt = train(_cfg("full", gradient_checkpointing=True))
    assert [h["train_loss"] for h in ckpt.history] == pytest.approx([h["train_loss"] for h in plain.history], rel=1e-5)


@pytest.mark.parametrize("method, quantization", [("last_layer", None), ("lora", None), ("lora", "4bit")])
def test_checkpointing_stops_the_backward_at_the_lowest_block_that_trains(method, quantization, tiny_model_dir):
    """transformers' checkpointing makes the embedding output need a gradient; the trainer drops that, so last_layer's
    backward no longer runs through (and recomputes) the frozen blocks below it. LoRA's adapters sit in every block:
    the gradient passes through all of them (PEFT makes the embedding output need one again, except on a 4-bit base,
    where the first block's adapters start the gradient). The losses are the plain run's."""
    from transformers import AutoModelForCausalLM

    from trainer.loop import enable_checkpointing
    from trainer.models import bnb_config, resolve_model_dir

    cfg = _cfg(method, quantization=quantization)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny"),
                                                 **({"quantization_config": bnb_config(cfg.dtype)} if quantization else {}))
    enable_checkpointing(model)
    model = get_method(method).prepare(model, cfg).train()
    hidden = model(input_ids=torch.tensor([[5, 6, 7, 8]]), output_hidden_states=True).hidden_states
    inputs = [h.requires_grad for h in hidden[:-1]]  # each block's input: the embedding output, then each block's output
    expected = {"last_layer": [False] * len(inputs), "lora": [quantization is None] + [True] * (len(inputs) - 1)}
    assert inputs == expected[method] and hidden[-1].requires_grad, (method, quantization, inputs)
    plain, ckpt = train(cfg), train(_cfg(method, quantization=quantization, gradient_checkpointing=True))
    assert [h["train_loss"] for h in ckpt.history] == pytest.approx([h["train_loss"] for h in plain.history], rel=1e-5)


def test_qlora_trains_adapters_on_a_4bit_base(tiny_model_dir, tmp_path):
    result = train(_cfg("lora", quantization="4bit", output_dir=str(tmp_path)))
    assert result.status == "completed", result.reason
    assert result.metrics["eval_loss"] < result.metrics["l0"]
    rows = {r["name"]: r for r in result.weight_change}
    q = rows["model.layers.0.self_attn.q_proj.weight"]  # dequantized base + the adapter's delta
    assert q["numel"] == 64 * 64 and 0 < q["rel_change"] < 1
    from trainer.outputs import load_finetuned

    model, _, cfg = load_finetuned(tmp_path)
    assert cfg.quantization == "4bit"
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


def test_the_8bit_optimizer_trains(tiny_model_dir):
    result = train(_cfg("full", optimizer="adamw_8bit"))
    assert result.status == "completed", result.reason
    assert result.metrics["eval_loss"] < result.metrics["l0"]


@pytest.mark.parametrize("method", ["full", "last_layer"])
def test_a_method_that_trains_the_base_refuses_a_4bit_base(method):
    with pytest.raises(ValueError, match=f"method {method} trains the base weights, which cannot be 4bit"):
        TrainConfig(model="tiny", method=method, quantization="4bit")


def test_the_weight_snapshot_copies_only_what_trains(tiny_model_dir):
    from trainer.loop import _snapshot
    from trainer.models import load_model

    model, _ = load_model("tiny", attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    method = get_method("last_layer")
    model = method.prepare(model, _cfg("last_layer"))
    snap = _snapshot(model, method, torch.device("cpu"))
    params = dict(model.named_parameters())
    copied = {n for n, t in snap.items() if t.data_ptr() != params[n].data_ptr()}
    assert copied == {n for n, p in params.items() if p.requires_grad}
    assert copied and "model.embed_tokens.weight" not in copied


def test_exports_carry_the_settings_and_load_in_their_libraries(tiny_model_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments

    from sweeps.results.export import hf_training_args, model_kwargs
    from trainer.models import bnb_config

    tc = _cfg("lora", dtype="bfloat16", gradient_checkpointing=True, optimizer="adamw_8bit", quantization="4bit")
    args = TrainingArguments(**json.loads(json.dumps(hf_training_args(tc, 32))), output_dir="unused", use_cpu=True)
    assert args.bf16 and args.activation_checkpointing and args.optim.value == "adamw_bnb_8bit"
    bnb = BitsAndBytesConfig(**json.loads(json.dumps(bnb_config(tc.dtype, as_dict=True))))
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_compute_dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb,
                                                 **json.loads(json.dumps(model_kwargs(tc))))
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert model.config._attn_implementation == "sdpa"
