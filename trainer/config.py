"""The typed configuration of one fine-tuning run.

Every field can be a dimension of a sweep (``space:`` in a sweep spec) or set
in a production config for ``python -m trainer.train CONFIG.yaml``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from trainer.yamlio import apply_overrides, read_yaml, validate

DEFAULT_HOLDOUT = 0.1  # share of a user's training file held out for the held-out loss when no eval data is given
MIN_EVAL_RECORDS = 8  # fewer held-out records than this, and every held-out verdict rests on a handful


def eval_size_warning(n_eval: int) -> str | None:
    """What a run or sweep says at start when its held-out set is small; None when it is not."""
    if n_eval >= MIN_EVAL_RECORDS:
        return None
    return (f"warning: only {n_eval} held-out record(s) (fewer than {MIN_EVAL_RECORDS}): every held-out loss, overfit "
            "verdict and best trial will rest on them; give eval data of your own or a larger eval fraction")


class TrainConfig(BaseModel):
    """One run. Frozen: build a new one with ``model_copy(update=...)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- model ---------------------------------------------------------
    model: str = "smollm2-135m"
    """A preset (``smollm2-135m``, ``tiny``), a local model directory, or a hub id already in the local HF cache."""
    trust_remote_code: bool = False  # off unless asked for: it runs code shipped with the model
    dtype: Literal["float32", "bfloat16"] = "float32"
    """The weights' dtype: bfloat16 loads them in bf16 (half the memory, on the CPU too; a GPU also autocasts the
    activations). LoRA adapters stay float32 (peft)."""
    quantization: Literal["4bit"] | None = None
    """4bit: the frozen base in bitsandbytes NF4 (QLoRA); only methods that train adapters on a frozen base take it."""
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass: less memory, ~30% slower
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"  # adamw_8bit: bitsandbytes' 8-bit AdamW states (a quarter the memory)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # eager where a model has no SDPA
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)  # torch CPU threads; None = torch's default (or the trial's CPUs)

    # --- method ----------------------------------------------------------
    method: str = "lora"  # a key of trainer.methods.METHODS: full | lora | last_layer
    lora_r: int = Field(8, ge=1)  # LoRA rank: higher = more capacity and memory
    lora_alpha: float = Field(16, gt=0)  # LoRA scale is alpha / r
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: str | list[str] = "all-linear"  # peft's shorthand for every linear layer but the head
    last_layers: int = Field(1, ge=1)  # last_layer: how many final transformer blocks train (plus the final norm)

    # --- data ------------------------------------------------------------
    train_data: str = "builtin:facts"  # JSONL path (prompt/completion or messages) or builtin:facts
    eval_data: str | None = None
    """JSONL path or builtin:...; None: the built-in facts' paraphrases for builtin:facts, else ``eval_fraction`` of
    the training file is held out. A user's training file is never evaluated on built-in data unless asked."""
    eval_fraction: float | None = Field(None, ge=0, lt=1)
    """With eval_data None: this share of train_data is held out (seeded, at least one record); None: 0.1 for a
    user's file; 0: evaluate on the training set itself (memorization only)."""
    max_examples: int | None = Field(None, ge=1)  # cap on training examples (after the split)
    seq_len: int = Field(64, ge=8)  # longer records are truncated with a warning
    prompt_loss_weight: float = Field(0.0, ge=0, le=1)  # 0 = completion-only loss, 1 = whole sequence

    # --- optimisation ----------------------------------------------------
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, ge=1)  # examples per optimizer step (before accumulation)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    epochs: float = Field(3, gt=0)  # ignored when max_steps is set
    max_steps: int | None = Field(None, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant_with_warmup", "constant", "exponential"] = "cosine"
    """exponential: the LR range test's ramp from lr_start up to learning_rate over the run (no warmup)."""
    lr_start: float = Field(1e-7, gt=0)  # first LR of the exponential ramp
    stop_factor: float | None = Field(None, gt=1)  # stop as diverged once the smoothed loss passes this x its minimum
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None disables clipping
    seed: int = 0

    # --- reporting -------------------------------------------------------
    report_every: int = Field(8, ge=1)  # examples between reports; the same for every trial of a sweep
    eval_every: int | None = Field(32, ge=1)  # examples between eval-loss points (rounded to reports); None = only at the end
    exact_match_every: int | None = Field(None, ge=1)
    """Examples between points of the memorization curve (a multiple of report_every): greedy exact match of the
    training completions (``train_exact_match``) and, with ``forgetting``, the reference-text NLL change, logged like
    the losses; None: both at the end only. How many epochs a completion needs before it comes back exactly."""
    ema_beta: float = Field(0.98, gt=0, lt=1)  # smoothing of the train loss (fastai, Lightning)
    memorization: bool = True  # exact match / token accuracy on train and eval completions
    forgetting: bool = True  # NLL change on a fixed reference text set that is not training data
    weight_change: bool = True  # per-layer ||W - W0|| / ||W0||

    # --- outputs ---------------------------------------------------------
    output_dir: str | None = None  # where the model/adapter, config.yaml and metrics.json go
    save_model: bool = True

    # --- testing hooks (not for normal use) --------------------------------
    # e.g. "nan@3", "explode@3", "oom@2", "crash@5", "hang@3", "hog@2": inject a fault at that optimizer step; crash
    # and hang happen on the first attempt only, so that a retry resumed from a checkpoint can show it recovers; hog
    # takes host memory until something kills the process (Ray's memory monitor)
    fault: str | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str, info: ValidationInfo) -> str:
        from trainer.methods import METHODS

        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; choose one of {', '.join(METHODS)}")
        quantization = info.data.get("quantization")  # declared above method, so already validated
        if quantization and not METHODS[value].quantized_base:
            takes = [name for name, m in METHODS.items() if m.quantized_base]
            raise ValueError(f"method {value} trains the base weights, which cannot be {quantization} (quantization); "
                             f"use method {' or '.join(takes)} (QLoRA) or drop quantization")
        return value

    @field_validator("fault")
    @classmethod
    def _fault_shape(cls, value: str | None) -> str | None:
        if value is None:
            return value
        kind, _, step = value.partition("@")
        if kind not in ("nan", "explode", "oom", "crash", "hang", "hog") or not step.isdigit():
            raise ValueError("fault must look like nan@K, explode@K, oom@K, crash@K, hang@K or hog@K")
        return value

    @model_validator(mode="before")
    @classmethod
    def _eval_source(cls, data: Any) -> Any:
        """Resolve where the held-out loss comes from, once (see ``eval_data``)."""
        if not isinstance(data, dict):
            return data
        train, ev, frac = data.get("train_data", "builtin:facts"), data.get("eval_data"), data.get("eval_fraction")
        if ev is not None and frac:
            raise ValueError("give eval_data or eval_fraction, not both")
        if ev is None and frac is None:
            from trainer.facts import heldout_of

            heldout = heldout_of(train) if isinstance(train, str) else None
            if heldout:  # a built-in training set: its paraphrases
                data = {**data, "eval_data": heldout}
            else:
                data = {**data, "eval_fraction": DEFAULT_HOLDOUT}
        return data

    @model_validator(mode="after")
    def _report_cadence(self) -> TrainConfig:
        if self.eval_every is not None and self.eval_every % self.report_every:
            raise ValueError(
                f"eval_every ({self.eval_every}) must be a multiple of report_every ({self.report_every})"
            )
        if self.exact_match_every is not None and self.exact_match_every % self.report_every:
            raise ValueError(
                f"exact_match_every ({self.exact_match_every}) must be a multiple of report_every ({self.report_every})"
            )
        return self

    def eval_plan(self) -> str:
        """Where the held-out loss comes from, in words (printed at the start of a run or sweep)."""
        if self.eval_data:
            return f"eval data: {self.eval_data}"
        if self.eval_fraction:
            return (f"eval data: {self.eval_fraction:.0%} of {self.train_data} held out (seeded, at least one record); "
                    "set eval_data to evaluate on a file of your own")
        return "eval data: none; the held-out loss is measured on the training set itself"

    @property
    def eval_batch_size(self) -> int:
        """Evaluation's batch: 16 short records (up to 1,024 tokens), else the training batch, so evaluating never needs
        more memory than a training step (its logits are batch x seq_len x vocabulary too)."""
        return max(self.batch_size, min(16, 1024 // self.seq_len))

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps of a run on ``n_train`` training examples: ``max_steps``, else the epochs' worth."""
        return self.max_steps or max(1, math.ceil(self.epochs * n_train / self.examples_per_step))

    def warmup_steps(self, total_steps: int) -> int:
        """The scheduler's warmup, in steps (what ``warmup_ratio`` means here; HF TrainingArguments takes steps)."""
        return round(self.warmup_ratio * total_steps)

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML run config, apply overrides and validate it (UserError on any problem)."""
    data = apply_overrides(read_yaml(path), overrides or [], source=str(path))
    return validate(TrainConfig, data, source=str(path))  # type: ignore[return-value]
