"""The training loop: one loop for every method.

    from trainer import TrainConfig, train
    result = train(TrainConfig(model="tiny", method="lora"), report=print)

``report(metrics, checkpoint)`` is called every ``report_every`` examples.
``metrics`` always carries ``examples_seen`` and ``step``; ``checkpoint`` is a
function that writes the resumable state into a directory, for callers (the
sweep) that keep checkpoints. The last call carries ``done: True`` and the
final metrics. The trainer never imports ray or mlflow.
"""
from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import base_eval, memory
from trainer.config import TrainConfig
from trainer.curves import DivergenceRule, Smoother
from trainer.data import collate, example_stream, run_records, tokenize
from trainer.methods import get_method, trainable_summary
from trainer.metrics import block_prefix, change_by_block, evaluate, token_nll, weight_change, weighted_loss
from trainer.models import load_for

Report = Callable[..., None]


@dataclass
class TrainResult:
    """The outcome of one run. ``status`` is completed, diverged or failed."""

    status: str
    reason: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    weight_change: list[dict[str, Any]] = field(default_factory=list)
    output_dir: Path | None = None


class _Diverged(Exception):
    pass


@dataclass
class _State:
    step: int = 0
    examples_seen: int = 0
    tokens_since: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    smoother: Smoother = field(default_factory=Smoother)  # the train loss's EMA (trainer.curves)
    stop_rule: DivergenceRule | None = None  # cfg.stop_factor's rule: the same rule the sweep stops and classifies with
    grad_norm: float | None = None
    train_time: float = 0.0
    train_time_mark: float = 0.0  # train_time at the previous report, for tokens/s
    eval_time: float = 0.0
    # Wall clock (time.time()) when step 1 finished: lets a sweep's start-up (command launch to first step) be
    # measured across processes (scripts/bench/sweep_overhead.py). Kept in checkpoints, so a resumed run keeps it.
    first_step_unix: float | None = None
    history: list = field(default_factory=list)


def train(
    cfg: TrainConfig,
    report: Report | None = None,
    *,
    resume_from: str | Path | None = None,
    progress: bool = False,
) -> TrainResult:
    """Fine-tune ``cfg.model`` with ``cfg.method``; return the result (never raises on divergence or OOM)."""
    t_setup = time.perf_counter()
    start_unix = time.time()  # wall clock, comparable across processes: when this trial's trainer began
    _seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg)
    memory.reset_peak(device)
    model, tokenizer = load_for(cfg, device)
    train_ex, eval_ex = _datasets(cfg, tokenizer)
    if cfg.quantization is None:  # a 4-bit model is placed on its device as it loads (bitsandbytes)
        model.to(device)
    base = base_eval.get(cfg, model, tokenizer, train_ex, eval_ex, device=device)
    method = get_method(cfg.method)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model = method.prepare(model, cfg)
    w0 = _snapshot(model, method, device) if cfg.weight_change else {}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, model, device)
    total_steps = cfg.total_steps(len(train_ex))
    scheduler = _scheduler(cfg, optimizer, total_steps)
    state = _State(smoother=Smoother(cfg.ema_beta),
                   stop_rule=DivergenceRule(cfg.stop_factor, spike=None) if cfg.stop_factor else None)
    if resume_from is not None:
        _load_checkpoint(Path(resume_from), model, optimizer, scheduler, state)
    stream = example_stream(train_ex, seed=cfg.seed)
    for _ in range(state.examples_seen):
        next(stream)
    static = {"l0": base["eval"]["loss"], **trainable_summary(model), "total_steps": total_steps,
              "resumed_from_step": state.step, "start_unix": start_unix,
              "train_records": len(train_ex), "eval_records": len(eval_ex),  # what every held-out verdict rests on
              **_token_shares(train_ex)}
    reference = base.pop("reference_examples", None)
    static["setup_time_s"] = time.perf_counter() - t_setup  # in every report: a pruned trial never sends the final one
    ctx = _Ctx(cfg, model, tokenizer, optimizer, scheduler, state, train_ex, eval_ex, reference, device, static, report,
               base_reference_nll=base.get("reference_nll"))
    status, reason = "completed", ""
    bar = _progress(progress, total_steps, state.step)
    try:
        while state.step < total_steps:
            _train_step(ctx, stream, params, resumed=resume_from is not None)
            bar.update(1)
            crossed = state.examples_seen // cfg.report_every > (state.examples_seen - cfg.examples_per_step) // cfg.report_every
            if crossed and state.step < total_steps:  # the last step's report is the final one, in _finish
                _report(ctx)
                bar.set_postfix(loss=f"{state.smoother.value:.3f}")
    except _Diverged as exc:
        status, reason = "diverged", str(exc)
    except torch.OutOfMemoryError:
        status, reason = "failed", f"out of memory at step {state.step + 1}"
    finally:
        bar.close()
    return _finish(ctx, base, w0, method, status, reason)


@dataclass
class _Ctx:
    cfg: TrainConfig
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    state: _State
    train_ex: list
    eval_ex: list
    reference: list | None
    device: torch.device
    static: dict
    report: Report | None
    base_reference_nll: float | None = None
    last_eval: float | None = None


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing, without the hook transformers adds with it that makes the embedding
    output need a gradient. Non-reentrant checkpointing needs no input that does: a trainable parameter inside a block
    is enough. With the hook, the backward of ``last_layer`` ran on through every frozen block below the trained ones,
    each recomputed and each keeping its input (about twice the step time, for nothing). PEFT sets its own hook for
    adapters, whose gradient passes through every block anyway."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()
    model.config.use_cache = False


def _train_step(ctx: _Ctx, stream, params, *, resumed: bool) -> None:
    cfg, state, model = ctx.cfg, ctx.state, ctx.model
    t0 = time.perf_counter()
    step = state.step + 1
    _inject_fault(cfg, step, ctx.optimizer, resumed)
    total = 0.0
    for _ in range(cfg.grad_accum):
        examples = [next(stream) for _ in range(cfg.batch_size)]
        batch = {k: v.to(ctx.device) for k, v in collate(examples, ctx.tokenizer.pad_token_id).items()}
        with _autocast(cfg, ctx.device):
            nll, target, valid, _ = token_nll(model, batch, with_correct=False)
            loss = weighted_loss(nll, target, valid, cfg.prompt_loss_weight)
        if cfg.fault == f"nan@{step}":
            loss = loss * float("nan")
        if not torch.isfinite(loss):
            raise _Diverged(f"non-finite loss ({loss.item()}) at step {step}")
        (loss / cfg.grad_accum).backward()
        total += loss.item() / cfg.grad_accum
        state.tokens_since += int(valid.sum())
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
    if not torch.isfinite(norm):
        raise _Diverged(f"non-finite grad norm at step {step}")
    ctx.optimizer.step()
    ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    state.step = step
    if step == 1 and not resumed:
        state.first_step_unix = time.time()
    state.examples_seen += cfg.examples_per_step
    state.loss_sum += total
    state.loss_count += 1
    state.grad_norm = norm.item()
    smoothed = state.smoother.update(total)
    reason = state.stop_rule.check(total, smoothed) if state.stop_rule else None
    if reason:
        raise _Diverged(f"{reason} at step {step}")
    state.train_time += time.perf_counter() - t0


def _report(ctx: _Ctx, extra: dict | None = None) -> dict:
    cfg, state = ctx.cfg, ctx.state
    metrics = {
        "step": state.step,
        "examples_seen": state.examples_seen,
        "epoch": state.examples_seen / len(ctx.train_ex),
        "train_loss": state.loss_sum / max(state.loss_count, 1) if state.loss_count else None,
        "train_loss_ema": state.smoother.value if state.smoother.n else None,
        "grad_norm": state.grad_norm,
        "lr": ctx.scheduler.get_last_lr()[0],
        "tokens_per_s": state.tokens_since / max(state.train_time - state.train_time_mark, 1e-9),
        "train_time_s": state.train_time,
        "eval_time_s": state.eval_time,
        "first_step_unix": state.first_step_unix,
        "peak_mem_gib": memory.peak_gib(ctx.device),
        **ctx.static,
    }
    due = cfg.eval_every is not None and state.examples_seen % cfg.eval_every < cfg.examples_per_step
    if due and not (extra and "eval_loss" in extra):  # the final report brings its own eval
        t0 = time.perf_counter()
        ev = evaluate(ctx.model, ctx.eval_ex, pad_id=ctx.tokenizer.pad_token_id, eos_id=ctx.tokenizer.eos_token_id,
                      batch_size=cfg.eval_batch_size, device=ctx.device)
        state.eval_time += time.perf_counter() - t0
        ctx.last_eval = ev["loss"]
        metrics["eval_loss"] = ev["loss"]
    em_due = cfg.exact_match_every is not None and state.examples_seen % cfg.exact_match_every < cfg.examples_per_step
    if em_due and not (extra and "train_exact_match" in extra):  # a completed run's final report brings its own
        metrics.update(_memorization_point(ctx))
    if extra:
        metrics.update(extra)
    metrics = {k: v for k, v in metrics.items() if v is not None}
    state.history.append({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))})
    state.loss_sum, state.loss_count, state.tokens_since = 0.0, 0, 0
    state.train_time_mark = state.train_time
    if ctx.report is not None:
        ctx.report(metrics, checkpoint=lambda path: _save_checkpoint(Path(path), ctx))
    return metrics


def _token_shares(examples) -> dict[str, float]:
    """Mean tokens per training example that the loss predicts: completion (weight 1) and the rest (weight
    ``prompt_loss_weight``; the first token is never predicted)."""
    completion = sum(sum(e.target) for e in examples)
    prompt = sum(len(e.input_ids) - 1 - sum(e.target) for e in examples)
    n = max(len(examples), 1)
    return {"prompt_tokens": prompt / n, "completion_tokens": completion / n}


def _memorization_point(ctx: _Ctx) -> dict[str, float]:
    """One point of the memorization curve (``exact_match_every``): greedy exact match of the training completions
    and, with ``forgetting``, the reference-text NLL change so far."""
    t0 = time.perf_counter()
    kw = dict(pad_id=ctx.tokenizer.pad_token_id, eos_id=ctx.tokenizer.eos_token_id,
              batch_size=ctx.cfg.eval_batch_size, device=ctx.device)
    out = {"train_exact_match": evaluate(ctx.model, ctx.train_ex, **kw)["exact_match"]}
    if ctx.cfg.forgetting and ctx.reference and ctx.base_reference_nll is not None:
        out["forgetting"] = evaluate(ctx.model, ctx.reference, **kw)["loss"] - ctx.base_reference_nll
    ctx.state.eval_time += time.perf_counter() - t0
    return out


def _finish(ctx: _Ctx, base: dict, w0: dict, method, status: str, reason: str) -> TrainResult:
    cfg, state, model = ctx.cfg, ctx.state, ctx.model
    final: dict[str, Any] = {"status": status, "reason": reason, "done": True}  # setup_time_s is in ctx.static
    changes: list[dict] = []
    if status == "completed":
        final.update(_final_metrics(ctx, base))
        if w0:
            changes = weight_change(w0, method.effective_state(model), blocks=block_prefix(model))
            by_block = change_by_block(changes)
            final["weight_change_by_layer"] = by_block
            final["weight_change_mean"] = sum(r["rel_change"] * r["numel"] for r in changes) / max(sum(r["numel"] for r in changes), 1)
            final["weights_changed_fraction"] = sum(r["numel"] for r in changes if r["rel_change"] > 1e-7) / max(sum(r["numel"] for r in changes), 1)
    else:
        # Report finite numbers: a diverged run's objective is min(last eval loss, l0).
        last = ctx.last_eval if ctx.last_eval is not None and math.isfinite(ctx.last_eval) else base["eval"]["loss"]
        final["eval_loss"] = min(last, base["eval"]["loss"])
    final["end_unix"] = time.time()  # with start_unix: when this run held its slot (concurrency, packing)
    metrics = _report(ctx, extra=final)
    out = None
    if cfg.output_dir:
        from trainer.outputs import write_outputs

        out = write_outputs(cfg, model, ctx.tokenizer, method, metrics, state.history, changes)
    return TrainResult(status, reason, metrics, state.history, changes, out)


def _final_metrics(ctx: _Ctx, base: dict) -> dict[str, Any]:
    """Final eval loss, memorization and forgetting, next to the base model's figures."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    kw = dict(pad_id=ctx.tokenizer.pad_token_id, eos_id=ctx.tokenizer.eos_token_id, batch_size=cfg.eval_batch_size, device=ctx.device)
    ev = evaluate(ctx.model, ctx.eval_ex, **kw)
    ctx.last_eval = ev["loss"]
    out: dict[str, Any] = {"eval_loss": ev["loss"], "eval_prompt_loss": ev["prompt_loss"]}
    if cfg.memorization:
        tr = evaluate(ctx.model, ctx.train_ex, **kw)
        out.update(
            train_completion_loss=tr["loss"], train_prompt_loss=tr["prompt_loss"],
            train_token_accuracy=tr["token_accuracy"], train_exact_match=tr["exact_match"],
            eval_token_accuracy=ev["token_accuracy"], eval_exact_match=ev["exact_match"],
            base_train_exact_match=base["train"]["exact_match"], base_eval_exact_match=base["eval"]["exact_match"],
        )
    if cfg.forgetting and ctx.reference:
        ref = evaluate(ctx.model, ctx.reference, **kw)
        out.update(reference_nll=ref["loss"], base_reference_nll=base["reference_nll"],
                   forgetting=ref["loss"] - base["reference_nll"])
    ctx.state.eval_time += time.perf_counter() - t0
    return out


def _snapshot(model, method, device: torch.device) -> dict:
    """What the weight change is measured from: a copy of the trainable parameters only (on the CPU when training
    on a GPU), the frozen ones by reference, and an adapter method's frozen base (``Method.base_state``)."""
    if method.base_state is not None:
        return method.base_state(model)
    keep = torch.device("cpu") if device.type == "cuda" else device
    return {name: (p.detach().to(keep, copy=True) if p.requires_grad else p.detach())
            for name, p in model.named_parameters()}


def _datasets(cfg: TrainConfig, tokenizer):
    train_records, eval_records = run_records(cfg)
    return (
        tokenize(train_records, tokenizer, cfg.seq_len, name=cfg.train_data),
        tokenize(eval_records, tokenizer, cfg.seq_len, name=cfg.eval_data or "eval split"),
    )


def _optimizer(cfg: TrainConfig, model, device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw_8bit":
        from trainer.models import require_bitsandbytes

        bnb = require_bitsandbytes("optimizer adamw_8bit")
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate)
    # fused AdamW: about 5x faster than the for-loop version on CPU (measured here on 135M params)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=True)


def _scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    from transformers import get_scheduler

    if cfg.scheduler == "exponential":  # Smith 2015 range test: lr_start * (end/start)^(t/T)
        ratio = cfg.lr_start / cfg.learning_rate
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: ratio ** max(0.0, 1 - t / max(total_steps - 1, 1)))

    return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps(total_steps),
                         num_training_steps=total_steps)


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _autocast(cfg: TrainConfig, device: torch.device):
    enabled = cfg.dtype == "bfloat16" and device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _inject_fault(cfg: TrainConfig, step: int, optimizer, resumed: bool) -> None:
    """Test hooks: real faults at a chosen step (see TrainConfig.fault)."""
    if not cfg.fault:
        return
    kind, _, at = cfg.fault.partition("@")
    if step < int(at):
        return
    if kind == "explode":  # a learning rate no model survives: the loss really blows up
        for group in optimizer.param_groups:
            group["lr"] = 10.0
    elif kind == "oom" and step == int(at):
        raise torch.OutOfMemoryError(f"injected out-of-memory at step {step}")
    elif kind == "crash" and step == int(at) and not resumed:
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang" and step == int(at) and not resumed:
        while True:  # a dead data loader or a deadlocked collective: alive, silent, never done
            time.sleep(60)
    elif kind == "hog" and step == int(at):
        _hog_memory()


def _hog_memory(chunk: int = 64 << 20, limit: int = 12 << 30) -> None:
    """Take host memory, page by page (touched, so it counts), until the process is killed; 12 GiB at most."""
    hoard = []
    while len(hoard) * chunk < limit:
        block = bytearray(chunk)
        block[::4096] = b"\1" * len(range(0, chunk, 4096))
        hoard.append(block)
        time.sleep(0.05)
    raise RuntimeError(f"hog: took {limit >> 30} GiB and nothing killed this process")


def _progress(enabled: bool, total: int, initial: int):
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    return _NoBar()


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def _save_checkpoint(path: Path, ctx: _Ctx) -> None:
    path.mkdir(parents=True, exist_ok=True)
    trainable = {n: p.detach().cpu() for n, p in ctx.model.named_parameters() if p.requires_grad}
    torch.save(
        {
            "trainable": trainable,
            "optimizer": ctx.optimizer.state_dict(),
            "scheduler": ctx.scheduler.state_dict(),
            "state": {k: v for k, v in vars(ctx.state).items()},
            "last_eval": ctx.last_eval,
            "rng": torch.get_rng_state(),
        },
        path / "trainer_state.pt",
    )


def _load_checkpoint(path: Path, model, optimizer, scheduler, state: _State) -> None:
    blob = torch.load(path / "trainer_state.pt", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in blob["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    for key, value in blob["state"].items():
        setattr(state, key, value)
    torch.set_rng_state(blob["rng"])
