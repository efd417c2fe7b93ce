"""trainer.memory.estimate: exact parameter counts from a meta-device model, and the sizes the settings imply.

The estimate against measured peaks of whole runs is tests/scripts/test_bench_memory_estimate.py."""
from __future__ import annotations

import pytest

from trainer.config import TrainConfig
from trainer.memory import GIB, estimate, facts_for
from trainer.methods import METHODS, get_method
from trainer.models import load_for

GB = 1e9


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory) -> str:
    """Only the config.json of Llama-3.1-8B's dimensions: the estimate builds the model on the meta device."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama-3.1-8b")
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                tie_word_embeddings=False).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_parameter_counts_match_a_loaded_and_prepared_model(method, tiny_model_dir):
    cfg = TrainConfig(model="tiny", method=method)
    model, _ = load_for(cfg)
    base = sum(p.numel() for p in model.parameters())
    model = get_method(method).prepare(model, cfg)
    facts = facts_for(cfg)
    assert facts.base_params == base
    assert facts.base_params + facts.adapter_params == sum(p.numel() for p in model.parameters())
    assert facts.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert facts.tied  # SmolLM2's family ties the head to the embedding: counted once


def test_the_model_facts_are_cached_per_model_and_method(tiny_model_dir):
    from trainer.memory import _facts

    facts_for(TrainConfig(model="tiny", method="lora"))
    before = _facts.cache_info().hits
    for lr in (1e-4, 3e-4, 1e-3):  # another trial of the same sweep: no model is built again
        estimate(TrainConfig(model="tiny", method="lora", learning_rate=lr, batch_size=2))
    assert _facts.cache_info().hits == before + 3


def test_bf16_halves_the_weights_and_4bit_quantizes_the_linears(tiny_model_dir):
    fp32 = estimate(TrainConfig(model="tiny", method="lora"))
    bf16 = estimate(TrainConfig(model="tiny", method="lora", dtype="bfloat16"))
    nf4 = estimate(TrainConfig(model="tiny", method="lora", dtype="bfloat16", quantization="4bit"))
    facts = facts_for(TrainConfig(model="tiny", method="lora"))
    adapters = facts.adapter_params * 4  # peft keeps adapters in float32
    assert bf16.weights - adapters == (fp32.weights - adapters) / 2 == facts.base_params * 2
    # NF4 with double quantization: 0.5 byte a weight plus about 1/64 byte of constants, for the linears only
    saved = bf16.weights - nf4.weights
    assert saved == pytest.approx(facts.quantizable_params * (2 - 0.516), rel=1e-3)
    assert bf16.gradients == fp32.gradients == facts.trainable_params * 4  # adapters train in float32 either way
    full = estimate(TrainConfig(model="tiny", method="full", dtype="bfloat16"))
    assert full.optimizer == 2 * full.gradients == 4 * facts.base_params  # torch AdamW's states take the bf16 dtype


def test_checkpointing_keeps_only_block_inputs(llama8b):
    for method in ("full", "lora", "last_layer"):
        plain = estimate(TrainConfig(model=llama8b, method=method, dtype="bfloat16", batch_size=1, seq_len=2048))
        ckpt = estimate(TrainConfig(model=llama8b, method=method, dtype="bfloat16", batch_size=1, seq_len=2048,
                                    gradient_checkpointing=True))
        if method == "last_layer":  # only the last block kept activations anyway: checkpointing adds its input only
            assert plain.activations < ckpt.activations < 1.2 * plain.activations  # every block's input: 2.2x
        else:
            assert ckpt.activations < plain.activations / 5, method
        assert ckpt.weights == plain.weights and ckpt.optimizer == plain.optimizer


def test_the_snapshot_counts_on_a_cpu_only_and_never_for_lora(tiny_model_dir):
    full = TrainConfig(model="tiny", method="full")
    assert estimate(full, device="cpu").snapshot == estimate(full).gradients
    assert estimate(full, device="cuda").snapshot == 0  # kept in host memory on a GPU
    assert estimate(TrainConfig(model="tiny", method="lora"), device="cpu").snapshot == 0  # the base by reference
    assert estimate(full.model_copy(update={"weight_change": False}), device="cpu").snapshot == 0


def test_describe_is_one_line_that_adds_up(tiny_model_dir):
    est = estimate(TrainConfig(model="tiny", method="full"))
    line = est.describe()
    assert "\n" not in line and line.startswith(f"{est.total_gib:.2f} GiB (peak at {est.peak_phase}): weights ")
    assert est.total_bytes == est.held + max(n for _, n in est.phases)
    assert est.total_bytes >= est.train_bytes


def test_llama_3_1_8b_on_one_gpu(llama8b):
    """Llama-3.1-8B's sizes on one 80 GB GPU, batch 1 x 2048.

    torchtune's single-device recipes report (their memory table for Llama 3.1 8B) about 16 GiB for LoRA, 7.4 GiB
    for QLoRA and 18.9 GiB for full fine-tuning. Ours are larger, for reasons in the trainer, not the arithmetic
    (torchtune's recipes/configs/llama3_1/8B_{full,lora,qlora}_single_device.yaml):
    - logits: torchtune computes the loss in chunks (CEWithChunkedOutputLoss, LinearCrossEntropyLoss), never the
      whole float32 batch x seq x vocab logits and their log-softmax; here the training step holds
      3 x 2048 x 128256 x 4 bytes = 2.9 GiB of them, and an evaluation batch of 16 sequences
      16 x 2048 x 128256 x 8 bytes = 31 GiB (so the whole run's peak is its evaluation's; ``train_bytes`` is the
      peak without it); torchtune's recipes evaluate nothing during the run and train on Alpaca's short records;
    - full: torchtune runs the optimizer in the backward pass (optimizer_in_bwd: no gradients held) with
      bitsandbytes' PagedAdamW8bit (2 bytes a parameter, pageable to the host); here torch AdamW keeps two states
      in the weights' dtype and all the gradients live until the step: 16 + 16 + 32 GB in bf16;
    - QLoRA: the 4-bit base is about the same (NF4, about 0.52 byte a weight for the linears; embeddings and head
      stay bf16: 2 x 128256 x 4096 x 2 bytes = 2.1 GB);
    - the weight-change table at the end makes float32 copies of one tensor at a time: 12 bytes x 525 M for the
      embedding matrix, about 6 GiB, on top of the held parts (LoRA too, though the embedding never changes).
    """
    def est(**kw):
        return estimate(TrainConfig(model=llama8b, batch_size=1, seq_len=2048, gradient_checkpointing=True, **kw))

    lora = est(method="lora", dtype="bfloat16")
    assert lora.weights / GB == pytest.approx(16.1, abs=0.2)  # 8.03 B bf16 weights + 21 M float32 adapter weights
    assert lora.gradients / GB == pytest.approx(0.084, abs=0.01)

    full = est(method="full", dtype="bfloat16")
    assert full.weights / GB == pytest.approx(16.06, abs=0.1)
    assert full.gradients == full.weights and full.optimizer == 2 * full.weights
    assert 64 * GB < full.train_bytes < 80 * GB  # fits an 80 GB GPU, barely

    fp32 = est(method="full")
    assert fp32.weights + fp32.gradients + fp32.optimizer > 128 * GB  # fp32 weights, grads and Adam: no 80 GB GPU
    assert fp32.total_bytes > 80 * GB

    qlora = est(method="lora", dtype="bfloat16", quantization="4bit")
    assert qlora.weights / GB == pytest.approx(5.8, abs=0.2)
    assert qlora.total_bytes < 24 * GB  # QLoRA fits a 24 GB GPU, its evaluation included: at 2,048 tokens the
    # trainer evaluates one record at a time (TrainConfig.eval_batch_size), not 16 (31 GiB of float32 logits)
    assert qlora.eval / GIB == pytest.approx(1 * 2048 * 128256 * 8 / GIB, rel=0.1)  # + a weight dequantized

