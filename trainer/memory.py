"""Memory: the measured peak of a run, and (``estimate``) what a run will need before it starts.

``estimate(cfg)`` predicts the peak of ``torch.cuda.max_memory_allocated`` over a whole ``train(cfg)`` (load,
training steps, evaluations, the weight-change table), from the model's config alone: the parameters are counted
on a model built on the meta device and prepared by the method, the rest from the config's dimensions (see the
notes above ``Estimate``). ``estimate(cfg, device="cpu")`` predicts a CPU run's peak of live tensor bytes;
``scripts/bench/memory_estimate.py`` measures that on real runs and prints both.

The measured peak (``peak_gib``, in every report) is the CUDA caching allocator's peak of allocated tensor memory
on a GPU (``max_memory_allocated``, what a memory cap limits), and the process's peak resident set (``VmHWM``, reset
at the start of each run) on a CPU, which includes the Python runtime and its libraries.
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



# --- the estimate of a run, before it starts ------------------------------------------------------------------------
#
# Where the bytes of a run go (trainer.loop.train), measured op by op on this project's models (saved-tensor hooks
# and the profiler's allocator events; scripts/bench/memory_estimate.py checks the sums against whole runs):
#
# - For the whole run: the weights, the optimizer's state (from the first step on), and on a CPU the weight-change
#   snapshot (a copy of the trainable tensors; on a GPU it is kept in host memory, and LoRA copies nothing).
# - On top of that, the largest of these moments:
#   - the start of a backward pass: every tensor the forward saved for backward, plus the float32 log-softmax of the
#     logits, its gradient and the logits' gradient (3 x batch x seq x vocab x 4 bytes), or a block's backward
#     temporaries; with gradient checkpointing the saved tensors are the input of each block the gradient passes
#     through (from the lowest trained one up: every block for full and LoRA, the trained ones for last_layer) plus
#     one block recomputed;
#   - the end of a backward pass: all the gradients (plus, for a trained tied embedding, its two partial gradients
#     being summed: the head's and the embedding's);
#   - an evaluation batch (16 sequences under no_grad): float32 logits and their log-softmax, 2 x 16 x seq x vocab x 4;
#   - the weight-change table at the end: one tensor's float32 copies and difference at a time.
#
# Per token and block, a Llama block (RMSNorm, attention, RMSNorm, gated MLP) saves: each norm's float32 input (4H,
# when its input needs a gradient) and, when the norm's weight trains, its normalized input (eH); the inputs of the
# linears that train (eH for q/k/v, eH for gate/up, eI for down; o_proj's input is SDPA's output); SDPA's query,
# repeated key and value, and output (4eH with padded batches, whose mask makes transformers repeat the KV heads),
# the mask made float (eT) and the log-sum-exp (4 x heads); the MLP's gate and up outputs and the SiLU (3eI). A LoRA
# adapter on a frozen linear saves its input too, as a float32 copy when the base computes in bf16 (peft casts the
# input to the adapter's dtype; under CUDA autocast the copy is the bf16 one autocast makes). e is the activations'
# bytes per element: 2 in bfloat16, 4 in float32.

# cuBLAS workspaces, taken from the caching allocator (so counted by max_memory_allocated) at the first matmul of each
# cuBLAS handle and stream: one for the forward (the main thread's handle), one for the backward (autograd's device
# thread has its own); 32 MiB each on Hopper (torch's default :4096:8), about 8 MiB on older GPUs. Not measured here.
_CUBLAS_WORKSPACE = 2 * 32 * 1024**2
_ATTN_IN, _ATTN_OUT, _MLP_IN, _MLP_OUT = ("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)


@dataclass(frozen=True)
class Estimate:
    """The predicted peak tensor memory of ``trainer.loop.train(cfg)``, in bytes, by part.

    ``weights``, ``optimizer``, ``snapshot`` and ``workspace`` are held through the run; ``phases`` are the moments
    that may set the peak on top of them (each a sum of the parts it holds then), and ``total_bytes`` is the held
    parts plus the largest phase. ``activations`` and ``logits`` are the training step's (at the start of the
    backward pass), ``eval`` an evaluation batch's, ``final`` the weight-change table's.
    """

    weights: int
    gradients: int
    optimizer: int
    snapshot: int
    activations: int
    logits: int
    eval: int
    final: int
    workspace: int
    phases: tuple[tuple[str, int], ...]

    @property
    def held(self) -> int:
        """What lives through the whole run."""
        return self.weights + self.optimizer + self.snapshot + self.workspace

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda kv: kv[1])[0]

    @property
    def total_bytes(self) -> int:
        return self.held + max(n for _, n in self.phases)

    @property
    def train_bytes(self) -> int:
        """The peak without the evaluation passes: what training itself needs."""
        return self.held + max(n for name, n in self.phases if name != "eval")

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def describe(self) -> str:
        """One line: ``3.21 GiB (peak at backward start): weights 1.00, optimizer 0.50, activations 1.20, ...``."""
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.2f}" for name in
                          ("weights", "gradients", "optimizer", "snapshot", "activations", "logits", "eval", "final",
                           "workspace") if getattr(self, name))
        return f"{self.total_gib:.2f} GiB (peak at {self.peak_phase}): {parts}"


@dataclass(frozen=True)
class _Facts:
    """What the estimate needs from a model: its dimensions, and its parameters once the method has prepared it."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # the output head is the input embedding matrix
    base_params: int  # the model's own parameters (the adapters apart)
    adapter_params: int  # parameters a method added (LoRA's A and B: float32 whatever the base dtype)
    quantizable_params: int  # weights of the linear layers a 4-bit load quantizes (all but the output head)
    largest_quantizable: int
    trainable_sizes: tuple[int, ...]  # numel of each trainable tensor
    largest_param: int  # of the model's own parameters
    largest_adapted: int  # the largest weight a LoRA adapter is merged into (0 without adapters)
    trained_blocks: int  # blocks whose own weights train
    block_params: int  # trainable parameters of one of them
    block_weights_train: bool
    embedding_trains: bool
    head_trains: bool
    final_norm_trains: bool
    adapted: tuple[str, ...]  # the names (q_proj, ...) of a block's linears that carry an adapter
    lora_r: int
    snapshots: bool  # the trainer copies the trainable tensors for the weight change (methods without base_state)

    @property
    def trainable_params(self) -> int:
        return sum(self.trainable_sizes)


def _dims(config) -> dict[str, int]:
    """Llama-style names, with GPT-2-style fallbacks (n_embd, n_layer, n_head, n_inner)."""
    def get(*names, default=None):
        return next((getattr(config, n) for n in names if getattr(config, n, None)), default)

    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    return {"hidden": hidden, "intermediate": get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            "layers": get("num_hidden_layers", "n_layer"), "heads": heads,
            "kv_heads": get("num_key_value_heads", default=heads), "head_dim": get("head_dim", default=hidden // heads),
            "vocab": config.vocab_size}


@functools.lru_cache(maxsize=64)
def _facts(model: str, method: str, trust_remote_code: bool, settings: tuple[tuple[str, object], ...]) -> _Facts:
    """Build the model from its config on the meta device (no weights are read) and prepare it with the method."""
    import re
    import warnings

    from torch import nn

    from trainer.architecture import decoder_blocks, final_norm, meta_model
    from trainer.config import TrainConfig
    from trainer.methods import get_method
    from trainer.models import resolve_model_dir

    net = meta_model(resolve_model_dir(model), trust_remote_code=trust_remote_code)
    config = net.config
    head, embedding = net.get_output_embeddings(), net.get_input_embeddings()
    quantizable = [m.weight.numel() for m in net.modules() if isinstance(m, nn.Linear) and m is not head]
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in settings}
    cfg = TrainConfig(model=model, method=method, trust_remote_code=trust_remote_code, **values)
    prepared = get_method(method)
    with warnings.catch_warnings():  # peft asks a deprecated transformers property
        warnings.simplefilter("ignore", FutureWarning)
        net = prepared.prepare(net, cfg)
    params = list(net.named_parameters())
    block = re.compile(rf"(?:^|\.){re.escape(decoder_blocks(net)[0])}\.(\d+)\.")  # any family's blocks; peft's prefix
    own = [(n, p) for n, p in params if "lora_" not in n]
    trained_blocks = {m.group(1) for n, p in own if p.requires_grad and (m := block.search(n))}
    adapted, largest_adapted = set(), 0
    for name, module in net.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer"):
            adapted.add(name.rsplit(".", 1)[-1])
            largest_adapted = max(largest_adapted, module.get_base_layer().weight.numel())
    trains = lambda module: module is not None and any(p.requires_grad for p in module.parameters())  # noqa: E731
    norm = final_norm(net)
    return _Facts(
        **_dims(config),
        tied=head is not None and head.weight is embedding.weight,
        base_params=sum(p.numel() for _, p in own),
        adapter_params=sum(p.numel() for n, p in params if "lora_" in n),
        quantizable_params=sum(quantizable),
        largest_quantizable=max(quantizable, default=0),
        trainable_sizes=tuple(p.numel() for _, p in params if p.requires_grad),
        largest_param=max(p.numel() for _, p in own),
        largest_adapted=largest_adapted,
        trained_blocks=len(trained_blocks),
        block_params=sum(p.numel() for n, p in own if p.requires_grad and block.search(n)) // max(len(trained_blocks), 1),
        block_weights_train=bool(trained_blocks),
        embedding_trains=trains(embedding),
        head_trains=trains(head),
        final_norm_trains=trains(norm[1] if norm else None),
        adapted=tuple(sorted(adapted)),
        lora_r=cfg.lora_r if adapted else 0,
        snapshots=prepared.base_state is None,
    )


def facts_for(cfg) -> _Facts:
    """The model facts of a TrainConfig, cached per model, method and the method's own settings (``Method.settings``):
    a sweep's trials that differ in anything else share one meta-device build."""
    from trainer.methods import get_method

    settings = tuple((name, tuple(v) if isinstance(v := getattr(cfg, name), list) else v)
                     for name in get_method(cfg.method).settings)
    return _facts(cfg.model, cfg.method, cfg.trust_remote_code, settings)


def _block_saved(f: _Facts, cfg, *, weights_train: bool, input_grad: bool, e: int, adapter_in: int, seq: int) -> int:
    """Bytes per token one block saves for backward (see the notes above)."""
    H, inter = f.hidden, f.intermediate

    def linear_inputs(names: tuple[str, ...], width: int) -> int:
        adapted = [n for n in names if n in f.adapted]
        if weights_train or (adapted and not adapter_in):
            return e * width  # the input itself, saved once for every linear that reads it
        return len(adapted) * adapter_in * width  # a copy per adapter, in the adapter's dtype

    norms = 2 * ((4 * H + 4 if input_grad else 0) + (e * H if weights_train else 0))
    if cfg.attn_implementation == "eager":  # the float32 softmax output (and its cast when bf16), no mask or lse
        kv, extra = 2 * e * H, (4 + (e if e != 4 else 0)) * f.heads * seq
    elif cfg.attn_implementation == "flash_attention_2":  # unpadded, unrepeated key/value heads
        kv, extra = 2 * e * f.kv_heads * f.head_dim, 4 * f.heads
    else:  # sdpa on padded batches: transformers repeats the KV heads; SDPA makes the bool mask float
        kv, extra = 2 * e * H, e * seq + 4 * f.heads
    attention = 2 * e * H + kv + extra
    o_proj = 0 if weights_train or not adapter_in else linear_inputs(_ATTN_OUT, H)  # else: SDPA's saved output
    mlp = 3 * e * inter + linear_inputs(_MLP_OUT, inter)
    lora = 4 * f.lora_r * len(f.adapted)  # the adapters' A outputs
    return norms + linear_inputs(_ATTN_IN, H) + attention + o_proj + linear_inputs(_MLP_IN, H) + mlp + lora


def estimate(cfg, device: str = "cuda") -> Estimate:
    """The peak tensor memory of ``train(cfg)`` on ``device``; for ``cuda`` what ``max_memory_allocated`` reports.

    Counts parameters exactly (the model is built on the meta device from its config) and the rest from the
    config's dimensions. An upper bound in the sequence length: every batch is taken to be ``cfg.seq_len`` tokens
    (batches are padded to their longest record, which may be shorter) and every evaluation batch full (16).
    Activations follow a Llama-style block; other architectures get the same formula for their dimensions.
    """
    f = facts_for(cfg)
    cuda = device.startswith("cuda")
    p = 2 if cfg.dtype == "bfloat16" else 4  # the weights' bytes per element
    e = p  # activations: bf16 weights compute in bf16 (CPU) or under bf16 autocast (CUDA)
    adapter_in = 0 if p == 4 else (2 if cuda else 4)  # a LoRA input's cast copy: none in float32
    t = 4 if f.adapter_params else p  # trainable tensors: adapters are float32, else the weights themselves

    if cfg.quantization == "4bit":  # NF4: 4 bits a weight, a uint8 absmax per 64, a float32 per 256 absmax
        weights = f.quantizable_params * (0.5 + 1 / 64 + 4 / (64 * 256)) + (f.base_params - f.quantizable_params) * p
    else:
        weights = f.base_params * p
    weights += f.adapter_params * 4
    gradients = f.trainable_params * t
    if cfg.optimizer == "adamw_8bit":  # bitsandbytes: 2 uint8 states + a float32 absmax per 256; float32 under 4096
        optimizer = sum(2 * n * (1 + 4 / 256) if n >= 4096 else 8 * n for n in f.trainable_sizes)
    else:  # torch AdamW: exp_avg and exp_avg_sq, zeros_like(param): the trainable tensors' dtype
        optimizer = 2 * gradients
    snapshot = gradients if cfg.weight_change and f.snapshots and not cuda else 0  # trainer.loop._snapshot

    seq, tokens, H = cfg.seq_len, cfg.batch_size * cfg.seq_len, f.hidden
    block = functools.partial(_block_saved, f, cfg, e=e, adapter_in=adapter_in, seq=seq)
    trained = block(weights_train=f.block_weights_train, input_grad=True)
    frozen = block(weights_train=False, input_grad=True)
    outside = ((8 if f.embedding_trains else 0) + 4 * H + 4 + (e * H if f.final_norm_trains else 0)
               + (e * H if f.head_trains else 0))  # token ids, the final norm's float32 input (and output)
    # A block's backward: gradients of its MLP activations (and of an adapter's float32 input copy and its cast)
    transient = (2 * e + (adapter_in if "down_proj" in f.adapted else 0)) * f.intermediate + e * H
    dequant = p * f.largest_quantizable if cfg.quantization == "4bit" else 0  # a 4-bit weight dequantized for a matmul
    head_grad = f.vocab * H * t if f.head_trains else 0  # held from the head's backward to the end
    logits = 3 * tokens * f.vocab * 4  # float32 log-softmax (saved), its gradient, the logits' gradient
    accumulated = gradients if cfg.grad_accum > 1 else 0  # the earlier micro-batches' gradients
    if cfg.gradient_checkpointing:
        # The input of each block the gradient passes through is kept: every block when the embedding trains or
        # adapters sit in every block (PEFT makes the embedding output need a gradient), else only the trained ones
        # (trainer.loop.enable_checkpointing: frozen blocks below them keep nothing and are not recomputed). The
        # backward recomputes one block at a time.
        through = f.layers if f.embedding_trains or f.adapted else f.trained_blocks
        kept = tokens * (through * e * H + outside)
        activations = kept + tokens * trained
        start = max(kept + logits, kept + head_grad + tokens * (trained + transient) + dequant)
        if f.block_weights_train and f.trained_blocks < through:  # frozen blocks between: their backward too
            start = max(start, gradients + kept + tokens * (frozen + transient))
        end = gradients
        if f.block_weights_train:  # the last block recomputed: its own gradients still coming, one linear's at most
            end += tokens * (trained + transient + e * H) + (H * f.intermediate - f.block_params) * t
    else:
        blocks = f.trained_blocks * trained + (f.layers - f.trained_blocks) * (frozen if f.adapted else 0)
        if not f.embedding_trains:
            blocks -= 4 * H + 4  # the first block's input needs no gradient: its norm saves nothing of it
        activations = tokens * (blocks + outside)
        start = activations + max(logits, tokens * transient + dequant + head_grad)
        end = gradients
    if f.tied and f.embedding_trains:  # last of all: the head's gradient and the embedding's, summed into a third
        end = max(end, gradients + 2 * f.vocab * H * t)
    eval_bytes = 2 * cfg.eval_batch_size * seq * f.vocab * 4 + dequant  # evaluate()'s batches (TrainConfig)
    final = 0
    if cfg.weight_change:
        # weight_change(): per tensor, float32 copies of W and W0 (none when float32), W0 moved to the GPU, W - W0
        plain = f.largest_param * (4 + (8 if p == 2 else 0) + (p if cuda and f.snapshots else 0))
        merged = f.largest_adapted * 12  # a LoRA weight merged: delta, base + delta, W0 in float32, difference
        final = max(plain, merged)
    phases = (("backward start", accumulated + start), ("backward end", end), ("optimizer step", gradients),
              ("eval", eval_bytes), ("weight change", final))
    return Estimate(weights=int(weights), gradients=int(gradients), optimizer=int(optimizer), snapshot=int(snapshot),
                    activations=int(activations), logits=int(logits), eval=int(eval_bytes), final=int(final),
                    workspace=_CUBLAS_WORKSPACE if cuda else 0, phases=tuple((k, int(v)) for k, v in phases))
