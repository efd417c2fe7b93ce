"""Memory: the measured peak of a run, and (``estimate``) what a run will need before it starts.

The peak is the CUDA caching allocator's peak of allocated tensor memory on a GPU (``max_memory_allocated``, what a
memory cap limits), and the process's peak resident set (``VmHWM``, reset at the start of each run) on a CPU,
which includes the Python runtime and its libraries.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 1024**3


def reset_peak(device: torch.device) -> None:
    """Start measuring this run's peak (a Ray worker runs many trials in one process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux >= 4.0: "5" resets the peak resident set of this process
            Path("/proc/self/clear_refs").write_text("5")


def peak_gib(device: torch.device) -> float | None:
    """The peak since ``reset_peak``, in GiB (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


# --- the estimate of a run, before it starts ---------------------------------------------------------------------

_EVAL_BATCH = 16  # trainer.loop._EVAL_BATCH: evaluate() runs batches of 16 under no_grad


@dataclass(frozen=True)
class Estimate:
    """The predicted peak tensor memory of ``trainer.loop.train(cfg)``, in bytes, by part.

    ``weights``, ``snapshot`` and ``optimizer`` live through the whole run; the rest are phases, and the peak is the
    largest phase on top of them: the backward pass (``activations`` + ``logits``), the optimizer step
    (``gradients``), an evaluation pass (``eval``) or the weight-change table at the end (``final``).
    """

    weights: int
    gradients: int
    optimizer: int
    snapshot: int
    activations: int
    logits: int
    eval: int
    final: int = 0

    @property
    def phases(self) -> dict[str, int]:
        return {"backward": self.activations + self.logits, "optimizer step": self.gradients,
                "eval": self.eval, "weight change": self.final}

    @property
    def peak_phase(self) -> str:
        return max(self.phases.items(), key=lambda kv: kv[1])[0]

    @property
    def total_bytes(self) -> int:
        return self.weights + self.snapshot + self.optimizer + max(self.phases.values())

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def describe(self) -> str:
        """One line: ``3.2 GiB (peak in backward): weights 1.0, optimizer 0.5, activations 1.2, ...``."""
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.2f}" for name in
                          ("weights", "gradients", "optimizer", "snapshot", "activations", "logits", "eval", "final")
                          if getattr(self, name))
        return f"{self.total_gib:.2f} GiB (peak in {self.peak_phase}): {parts}"


@dataclass(frozen=True)
class _Facts:
    """What the estimate needs from a model: its dimensions and parameter counts after the method's prepare."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    total_params: int
    trainable_params: int
    adapter_params: int  # parameters a method added (LoRA's A and B: float32 whatever the base dtype)
    quantizable_params: int  # weights of the linear layers a 4-bit load quantizes (all but the output head)
    largest_param: int
    trainable_sizes: tuple[int, ...]


def _dims(config) -> dict[str, int]:
    get = lambda *names, default=None: next((getattr(config, n) for n in names if getattr(config, n, None)), default)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    return {"hidden": hidden, "intermediate": get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            "layers": get("num_hidden_layers", "n_layer"), "heads": heads,
            "kv_heads": get("num_key_value_heads", default=heads), "head_dim": get("head_dim", default=hidden // heads),
            "vocab": config.vocab_size}


@functools.lru_cache(maxsize=64)
def _facts(model: str, method: str, trust_remote_code: bool, lora: tuple, last_layers: int) -> _Facts:
    """Build the model from its config on the meta device (no weights read) and apply the method to it."""
    from types import SimpleNamespace

    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.methods import get_method
    from trainer.models import resolve_model_dir

    config = AutoConfig.from_pretrained(resolve_model_dir(model), trust_remote_code=trust_remote_code, local_files_only=True)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = net.get_output_embeddings()
    quantizable = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Linear) and m is not head)
    r, alpha, dropout, targets = lora
    settings = SimpleNamespace(lora_r=r, lora_alpha=alpha, lora_dropout=dropout,
                               lora_target_modules=list(targets) if isinstance(targets, tuple) else targets,
                               last_layers=last_layers)
    net = get_method(method).prepare(net, settings)
    params = list(net.named_parameters())
    return _Facts(
        **_dims(config),
        total_params=sum(p.numel() for _, p in params),
        trainable_params=sum(p.numel() for _, p in params if p.requires_grad),
        adapter_params=sum(p.numel() for n, p in params if "lora_" in n),
        quantizable_params=quantizable,
        largest_param=max(p.numel() for _, p in params),
        trainable_sizes=tuple(p.numel() for _, p in params if p.requires_grad),
    )


def facts_for(cfg) -> _Facts:
    targets = cfg.lora_target_modules
    targets = tuple(targets) if isinstance(targets, list) else targets
    lora = (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets) if cfg.method == "lora" else (0, 0, 0, "")
    return _facts(cfg.model, cfg.method, cfg.trust_remote_code, lora, cfg.last_layers if cfg.method == "last_layer" else 0)


def estimate(cfg, device: str = "cuda") -> Estimate:
    """The peak tensor memory of ``train(cfg)`` on ``device`` (``cuda``: what ``max_memory_allocated`` reports).

    An upper bound in the sequence length: every batch is taken to be ``cfg.seq_len`` tokens long (batches are
    padded to their longest record, which may be shorter).
    """
    f = facts_for(cfg)
    dtype_bytes = 2 if cfg.dtype == "bfloat16" else 4
    base = f.total_params - f.adapter_params
    if cfg.quantization == "4bit":
        # NF4: 4 bits a weight, one uint8 absmax per 64 weights, one float32 per 256 absmax (double quantization)
        weights = f.quantizable_params * (0.5 + 1 / 64 + 4 / (64 * 256)) + (base - f.quantizable_params) * dtype_bytes
    else:
        weights = base * dtype_bytes
    weights += f.adapter_params * 4  # peft keeps adapters in float32
    train_bytes = 4 if cfg.method == "lora" else dtype_bytes  # the trainable tensors' dtype
    gradients = f.trainable_params * train_bytes
    if cfg.optimizer == "adamw_8bit":
        optimizer = sum(2 * n if n >= 4096 else 8 * n for n in f.trainable_sizes)
    else:
        optimizer = 2 * f.trainable_params * train_bytes  # exp_avg, exp_avg_sq: zeros_like(param)
    snapshot = f.trainable_params * train_bytes if device == "cpu" and cfg.method != "lora" else 0
    tokens = cfg.batch_size * cfg.seq_len
    act_bytes = dtype_bytes
    per_block = (10 * f.hidden + 4 * f.intermediate) * act_bytes
    trained_blocks = min(cfg.last_layers, f.layers) if cfg.method == "last_layer" else f.layers
    if cfg.gradient_checkpointing:
        activations = tokens * (f.layers * f.hidden * act_bytes + per_block)
    else:
        activations = tokens * trained_blocks * per_block
    logits = 3 * tokens * f.vocab * 4  # float32 logits' log-softmax, its gradient and the logits' gradient
    eval_bytes = 2 * _EVAL_BATCH * cfg.seq_len * f.vocab * 4  # float32 logits and their log-softmax
    final = 3 * f.largest_param * 4 if cfg.weight_change else 0
    return Estimate(weights=int(weights), gradients=int(gradients), optimizer=int(optimizer), snapshot=int(snapshot),
                    activations=int(activations), logits=int(logits), eval=int(eval_bytes), final=int(final))
