"""The measures of what fine-tuning changed: weight change, losses, memorization, forgetting, EMA.

Hand-built tensors and a hand-built bigram model where the answer is known;
the tiny model where the real torch/transformers/peft path is the point.

    python -m pytest -q tests/trainer/test_metrics.py
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trainer import TrainConfig, train
from trainer.data import Example, collate
from trainer.methods import get_method
from trainer.metrics import (
    REFERENCE_PROMPTS,
    change_by_block,
    evaluate,
    materialize,
    reference_set,
    token_nll,
    weight_change,
    weighted_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- weight change ----------------------------------------------------------------------


def test_weight_change_is_the_norm_of_the_change_over_the_norm_of_the_start():
    before = {"a": torch.ones(4, 4), "b": torch.tensor([3.0, 4.0])}
    after = {"a": 1.1 * torch.ones(4, 4), "b": torch.tensor([3.0, 9.0])}
    rel = {r["name"]: r["rel_change"] for r in weight_change(before, after)}
    assert rel["a"] == pytest.approx(0.1, rel=1e-5)
    assert rel["b"] == pytest.approx(5.0 / 5.0)


def test_weight_change_reads_the_block_index_from_the_parameter_name():
    names = ["model.layers.3.mlp.up_proj.weight", "model.layers.12.self_attn.q_proj.weight",
             "model.embed_tokens.weight", "model.norm.weight"]
    rows = weight_change({n: torch.ones(2) for n in names}, {n: torch.ones(2) for n in names}, blocks="model.layers")
    assert [(r["name"], r["block"]) for r in rows] == list(zip(names, [3, 12, None, None]))
    assert all(r["numel"] == 2 and r["rel_change"] == 0 for r in rows)


def test_weight_change_counts_blocks_under_the_name_it_is_given():
    names = ["transformer.h.3.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.ln_f.weight",
             "model.layers.1.mlp.up_proj.weight"]
    same = {n: torch.ones(2) for n in names}
    assert [r["block"] for r in weight_change(same, same, blocks="transformer.h")] == [3, 0, None, None]
    assert [r["block"] for r in weight_change(same, same)] == [None] * 4  # blocks not found: none is a block's


def test_weight_change_of_a_zero_tensor_is_one_if_it_moved_and_zero_if_not():
    before = {"moved": torch.zeros(3), "still": torch.zeros(3)}
    after = {"moved": torch.tensor([0.0, 1e-3, 0.0]), "still": torch.zeros(3)}
    rel = {r["name"]: r["rel_change"] for r in weight_change(before, after)}
    assert rel == {"moved": 1.0, "still": 0.0}


def test_weight_change_skips_tensors_absent_after_training():
    rows = weight_change({"kept": torch.ones(2), "gone": torch.ones(2)}, {"kept": torch.ones(2)})
    assert [r["name"] for r in rows] == ["kept"]


def test_weight_change_compares_bfloat16_tensors_in_float32():
    before = {"w": torch.ones(8, dtype=torch.bfloat16)}
    after = {"w": torch.full((8,), 1.5, dtype=torch.bfloat16)}
    assert weight_change(before, after)[0]["rel_change"] == pytest.approx(0.5)


def _by_layer(before, after) -> dict[str, dict]:
    return {row["layer"]: row for row in change_by_block(weight_change(before, after, blocks="model.layers"))}


def test_change_by_block_groups_a_block_and_names_tensors_outside_blocks():
    names = ["model.layers.3.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight",
             "model.layers.1.mlp.up_proj.weight", "model.layers.10.mlp.up_proj.weight",
             "model.embed_tokens.weight", "model.norm.weight"]
    same = {n: torch.ones(2) for n in names}
    rows = change_by_block(weight_change(same, same, blocks="model.layers"))
    assert [r["layer"] for r in rows] == ["block 3", "block 1", "block 10", "embed_tokens", "norm"]


def test_change_by_block_weights_the_mean_by_parameter_count():
    up, q = "model.layers.3.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight"
    before = {up: torch.ones(3, 2), q: torch.ones(2, 1)}
    after = {up: 1.1 * torch.ones(3, 2), q: torch.ones(2, 1)}
    block = _by_layer(before, after)["block 3"]
    assert block["rel_change"] == pytest.approx(0.1 * 6 / 8, rel=1e-5)


def test_changed_fraction_is_the_share_of_parameters_in_tensors_that_moved():
    up, q, norm = "model.layers.3.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight", "model.norm.weight"
    before = {up: torch.ones(3, 2), q: torch.ones(2, 1), norm: torch.ones(4)}
    after = {up: 1.1 * torch.ones(3, 2), q: torch.ones(2, 1), norm: torch.ones(4)}
    layers = _by_layer(before, after)
    assert layers["block 3"]["changed_fraction"] == pytest.approx(6 / 8)
    assert layers["norm"]["changed_fraction"] == 0.0


# --- LoRA merged weight change ---------------------------------------------------------


_LORA_R, _LORA_ALPHA = 4, 8  # scale alpha / r = 2


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    """The tiny model with LoRA adapters whose B is random (peft starts B at zero: no delta)."""
    from trainer.models import load_model

    model, _ = load_model("tiny")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(model="tiny", method="lora", lora_r=_LORA_R, lora_alpha=_LORA_ALPHA)
    peft_model = get_method("lora").prepare(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return peft_model, w0


def _lora_delta(module) -> torch.Tensor:
    return module.lora_B["default"].weight @ module.lora_A["default"].weight * (_LORA_ALPHA / _LORA_R)


def _effective_state(model) -> dict[str, torch.Tensor]:
    return {k: materialize(v) for k, v in get_method("lora").effective_state(model).items()}


def test_lora_effective_state_is_base_weight_plus_b_times_a_times_alpha_over_r(lora_model):
    peft_model, w0 = lora_model
    q = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(_effective_state(peft_model)[name], w0[name] + _lora_delta(q))


def test_lora_effective_state_has_the_base_names_and_untouched_non_adapted_weights(lora_model):
    peft_model, w0 = lora_model
    state = _effective_state(peft_model)
    assert set(state) == set(w0)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(state[name], w0[name]), name


def test_lora_base_state_is_the_frozen_base_under_the_same_names_without_copies(lora_model):
    peft_model, w0 = lora_model
    base = get_method("lora").base_state(peft_model)
    assert set(base) == set(w0)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(materialize(base[name]), w0[name])
    q = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    assert materialize(base["model.layers.0.self_attn.q_proj.weight"]).data_ptr() == q.base_layer.weight.data_ptr()


def test_lora_weight_change_is_the_norm_of_the_merged_delta(lora_model):
    peft_model, w0 = lora_model
    rows = {r["name"]: r for r in weight_change(w0, _effective_state(peft_model))}
    delta = _lora_delta(peft_model.get_base_model().model.layers[1].mlp.down_proj)
    name = "model.layers.1.mlp.down_proj.weight"
    assert rows[name]["rel_change"] == pytest.approx((delta.norm() / w0[name].norm()).item(), rel=1e-4)


# --- token NLL, weighted loss, evaluate on a hand-built bigram model ----------------------

# Next-token probabilities given the current token; token 2 is EOS and pad (as in SmolLM2).
_BIGRAM = torch.tensor([[0.1, 0.7, 0.2], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]])
_EOS = _PAD = 2


class _Bigram(nn.Module):
    """A model whose logits depend only on the current token: every loss below is known by hand."""

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=_BIGRAM.log()[input_ids])


def _nll(cur: int, nxt: int) -> float:
    return -math.log(_BIGRAM[cur, nxt].item())


# prompt 0 0 | completion 1 EOS: predicts 0->0 (prompt, wrong), 0->1 (right), 1->EOS (right).
_EXACT = Example((0, 0, 1, 2), (False, False, True, True), "exact")
# prompt 0 1 | completion 0: predicts 0->1 (prompt, right), 1->0 (wrong: the argmax is 2).
_MISSED = Example((0, 1, 0), (False, False, True), "missed")


def test_token_nll_shifts_by_one_and_masks_padding():
    batch = collate([_EXACT, _MISSED], _PAD)
    nll, target, valid, correct = token_nll(_Bigram(), batch)
    assert nll.shape == target.shape == valid.shape == correct.shape == (2, 3)
    assert nll[0].tolist() == pytest.approx([_nll(0, 0), _nll(0, 1), _nll(1, 2)])
    assert target.tolist() == [[False, True, True], [False, True, False]]
    assert valid.tolist() == [[True, True, True], [True, True, False]]
    assert correct[0].tolist() == [False, True, True]


def test_weighted_loss_gives_padding_no_weight_even_with_prompt_weight_one():
    nll = torch.tensor([[1.0, 3.0, 100.0]])
    target = torch.tensor([[False, True, False]])
    valid = torch.tensor([[True, True, False]])
    assert weighted_loss(nll, target, valid, 1.0).item() == pytest.approx(2.0)


def test_weighted_loss_without_any_weighted_token_is_zero_not_nan():
    nll = torch.tensor([[1.0, 2.0]])
    target = torch.zeros(1, 2, dtype=torch.bool)
    assert weighted_loss(nll, target, torch.ones(1, 2, dtype=torch.bool), 0.0).item() == 0.0


def _evaluate_bigram(examples, batch_size=2):
    return evaluate(_Bigram(), examples, pad_id=_PAD, eos_id=_EOS, batch_size=batch_size, device="cpu")


def test_evaluate_reports_completion_loss_and_prompt_loss_separately():
    m = _evaluate_bigram([_EXACT, _MISSED])
    assert m["loss"] == pytest.approx((_nll(0, 1) + _nll(1, 2) + _nll(1, 0)) / 3)
    assert m["prompt_loss"] == pytest.approx((_nll(0, 0) + _nll(0, 1)) / 2)


def test_token_accuracy_is_the_teacher_forced_argmax_share_of_completion_tokens():
    assert _evaluate_bigram([_EXACT, _MISSED])["token_accuracy"] == pytest.approx(2 / 3)  # not the right prompt token


def test_exact_match_is_the_share_of_examples_with_every_completion_token_right():
    assert _evaluate_bigram([_EXACT, _MISSED])["exact_match"] == pytest.approx(1 / 2)


def test_evaluate_does_not_depend_on_the_batch_size():
    examples = [_EXACT, _MISSED, _EXACT]
    assert _evaluate_bigram(examples, batch_size=1) == pytest.approx(_evaluate_bigram(examples, batch_size=3))


def test_evaluate_restores_the_training_mode():
    model = _Bigram().train()
    evaluate(model, [_EXACT], pad_id=_PAD, eos_id=_EOS, batch_size=1, device="cpu")
    assert model.training


# --- greedy exact match and forgetting on the tiny model --------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from trainer.models import load_model

    model, tokenizer = load_model("tiny")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("reference") / "sub" / "key.json"


@pytest.fixture(scope="module")
def reference(tiny, reference_cache):
    """The tiny model's reference set, generated once and written to a cache file."""
    model, tokenizer = tiny
    return reference_set(model, tokenizer, reference_cache, device="cpu")


def _evaluate_tiny(tiny, examples):
    model, tokenizer = tiny
    return evaluate(model, examples, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                    batch_size=16, device="cpu")


def test_exact_match_is_one_on_the_models_own_greedy_generations(tiny, reference):
    m = _evaluate_tiny(tiny, reference)
    assert m["exact_match"] == 1.0
    assert m["token_accuracy"] == 1.0


def test_exact_match_fails_on_a_completion_one_token_off_greedy(tiny, reference):
    eos = tiny[1].eos_token_id
    ex = reference[0]
    i = ex.target.index(True) + 3
    other = next(t for t in (5, 6) if t not in (ex.input_ids[i], eos))
    changed = Example(ex.input_ids[:i] + (other,) + ex.input_ids[i + 1 :], ex.target, ex.source)
    assert _evaluate_tiny(tiny, [changed, *reference[1:]])["exact_match"] == pytest.approx(7 / 8)


def test_reference_set_is_the_same_whatever_the_random_seed(tiny, reference):
    model, tokenizer = tiny
    torch.manual_seed(12345)
    again = reference_set(model, tokenizer, None, device="cpu")
    assert again == reference
    assert len(reference) == len(REFERENCE_PROMPTS)
    assert all(any(e.target) and not e.target[0] for e in reference)


def test_reference_set_is_cached_and_read_back_unchanged(reference, reference_cache):
    assert not list(reference_cache.parent.glob("*.tmp"))
    assert reference_set(None, None, reference_cache, device="cpu") == reference  # no model: read from the file


def test_reference_nll_is_deterministic(tiny, reference):
    assert _evaluate_tiny(tiny, reference)["loss"] == _evaluate_tiny(tiny, reference)["loss"]


# --- forgetting and EMA in a real (very short) run --------------------------------------


@pytest.fixture(scope="module")
def short_run(tiny_model_dir, tmp_path_factory):
    """Four steps of full fine-tuning at a high LR, reporting every step, with the model saved."""
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(model="tiny", method="full", learning_rate=1e-2, batch_size=2, max_steps=4, seq_len=32,
                      max_examples=8, report_every=2, eval_every=None, memorization=False, weight_change=False,
                      forgetting=True, output_dir=str(out))
    result = train(cfg)
    assert result.status == "completed", result.reason
    return result, out


def test_forgetting_is_tuned_reference_nll_minus_base_reference_nll(short_run, tiny, reference):
    from trainer.outputs import load_finetuned

    result, out = short_run
    m = result.metrics
    tuned, tokenizer, _ = load_finetuned(out)
    assert m["base_reference_nll"] == pytest.approx(_evaluate_tiny(tiny, reference)["loss"], rel=1e-5)
    assert m["reference_nll"] == pytest.approx(_evaluate_tiny((tuned, tokenizer), reference)["loss"], rel=1e-4)
    assert m["forgetting"] == pytest.approx(m["reference_nll"] - m["base_reference_nll"])
    assert m["forgetting"] != 0


def test_train_loss_ema_is_the_bias_corrected_ema_of_the_step_losses(short_run):
    result, _ = short_run
    beta = 0.98
    steps = [h for h in result.history if "train_loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3, 4]
    ema = 0.0
    for n, h in enumerate(steps, start=1):
        ema = beta * ema + (1 - beta) * h["train_loss"]
        assert h["train_loss_ema"] == pytest.approx(ema / (1 - beta**n), rel=1e-9), f"step {n}"
    assert steps[0]["train_loss_ema"] == pytest.approx(steps[0]["train_loss"])


def test_exact_match_does_not_require_the_chat_templates_newline_after_eos():
    from trainer.metrics import _exact_rows

    eos = 2
    labels = torch.tensor([[5, 6, eos, 7], [5, 6, eos, 7]])  # "answer <|im_end|> \n"
    target = torch.ones_like(labels, dtype=torch.bool)
    correct = torch.tensor([[True, True, False, False], [True, False, True, True]])
    assert _exact_rows(correct, target, labels, eos).tolist() == [True, False]


def test_exact_match_every_logs_the_memorization_curve_with_its_forgetting(tiny_model_dir):
    """One example, 6 steps at batch 1: a train exact-match (and forgetting) point every 2 examples, like the losses."""
    reports = []
    cfg = TrainConfig(model="tiny", method="full", train_data="builtin:facts:1", eval_data="builtin:facts-heldout:1",
                      learning_rate=3e-3, batch_size=1, epochs=6, scheduler="constant", warmup_ratio=0, seq_len=32,
                      report_every=1, eval_every=None, exact_match_every=2, weight_change=False, forgetting=True)
    result = train(cfg, report=lambda m, checkpoint=None: reports.append(m))
    assert result.status == "completed", result.reason
    points = {m["examples_seen"]: m for m in reports if "train_exact_match" in m}
    assert sorted(points) == [2, 4, 6]
    assert all(m["train_exact_match"] in (0.0, 1.0) and math.isfinite(m["forgetting"]) for m in points.values())
    assert points[6]["forgetting"] == pytest.approx(result.metrics["forgetting"])  # the final point is the end's
    assert {m["eval_records"] for m in reports} == {1} and {m["train_records"] for m in reports} == {1}
    assert [h["examples_seen"] for h in result.history if "train_exact_match" in h] == [2, 4, 6]
    with pytest.raises(ValueError, match="exact_match_every"):
        TrainConfig(report_every=4, exact_match_every=6)
