"""Memory estimate vs measured peak: ``trainer.memory.estimate(cfg)`` against the real peak of ``train(cfg)``.

    python scripts/bench/memory_estimate.py             # tiny and SmolLM2-135M, full/lora/last_layer, checkpointing off/on
    python scripts/bench/memory_estimate.py --quick     # the tiny model only, 8 runs 2 at a time: the CI check
    python scripts/bench/memory_estimate.py --models smollm2-135m --methods lora --dtypes float32,bfloat16 --out mem.json

Each row is one whole run of ``trainer.loop.train(cfg)`` (load, base evaluation, a few optimizer steps, the final
evaluation with memorization and forgetting, the weight-change table) in a fresh process on this CPU, next to
``estimate(cfg, device="cpu")`` computed before it starts, and their ratio (estimate / measured).

What is measured: the peak of live tensor bytes, the CPU counterpart of ``torch.cuda.max_memory_allocated``.
A CPU has no allocator peak counter, and the process's resident set counts the Python runtime, its libraries and
freed pages the C allocator keeps, so neither is used. Instead the run goes under
``torch.profiler.profile(profile_memory=True)``: torch's CPU allocator reports every allocation and free to the
profiler with the running total of bytes it has handed out since profiling began (``total_allocated`` of each
allocation event, the same bookkeeping as ``c10``'s ``ProfiledCPUMemoryReporter``). Profiling starts before
``train`` is called, so every tensor the run allocates is counted and every free is subtracted; the peak of that
running total is the run's peak of allocator memory. One addition: safetensors maps a checkpoint's file into
memory, and a float32 model loaded from it keeps parameters whose storage is that mapping, never handed out by the
allocator (on a GPU they are copied into allocator memory by ``model.to``). Those storages (found as the model's
parameter and buffer storages whose address no allocation event returned) are added to the peak: they are live
from the load to the end. A tensor the allocator handed out before profiling and the run frees would not be
subtracted; a fresh process per row leaves none.

A second table measures one forward and backward pass of a random 2-block model of SmolLM2's block shape with a
1,024-token vocabulary (``block_row``): there the saved activations, a block's recomputation under checkpointing
and the gradients set the peak, which whole runs of 49k-vocabulary models never show (their logits do).

What a CPU run cannot check: the CUDA-only parts of the estimate (the cuBLAS workspaces, autocast's bf16 copies
where a CPU keeps peft's float32 ones, bitsandbytes' CUDA 4-bit kernels). With this trainer's evaluation batch of 16
sequences, an evaluation pass (16 x seq x vocab float32 logits and their log-softmax) sets the peak of many small-model
rows; the rows whose peak is the training step's show it in the "estimated peak" column.

The data: generated prompt/completion records, half of them longer than ``seq_len`` (truncated) and half shorter,
so that every batch is padded to ``seq_len`` (the length the estimate assumes, an upper bound) and carries an
attention mask (padded batches: what real data does; SDPA then takes the masked kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a file: import this checkout's packages

MIB = 1024**2
HEADER = ("| model | method | dtype | checkpointing | batch x seq | estimate MiB | measured MiB | ratio "
          "| estimated peak | measured peak at |")
# (batch, seq_len) per model: batch 4-8 and seq_len 48-128. With a batch of 8 or less, the tiny model's peak is an
# evaluation batch's (16 sequences' logits); --quick adds rows at batch 16, where its training step sets the peak.
SHAPES = {"tiny": (8, 64), "smollm2-135m": (4, 128)}
TRAINING_PEAK_BATCH = 16
STEPS = 3
WORDS = ("river stone lantern copper meadow violin harbor cedar orbit marble thunder basil quartz falcon "
         "ember willow canyon saffron glacier cobalt").split()


def write_data(folder: Path, n: int = 16) -> tuple[str, str]:
    """Train and eval JSONL files: alternately far longer than any seq_len here and about a third as long."""
    import random

    rng = random.Random(0)
    paths = []
    for split in ("train", "eval"):
        path = folder / f"{split}.jsonl"
        with path.open("w") as handle:
            for i in range(n):
                words = 200 if i % 2 == 0 else 12
                completion = " ".join(rng.choice(WORDS) for _ in range(words))
                handle.write(json.dumps({"prompt": f"Record {split} {i}:", "completion": " " + completion}) + "\n")
        paths.append(str(path))
    return paths[0], paths[1]


def row_config(model: str, method: str, dtype: str, checkpointing: bool, batch: int | None, train: str, eval_: str):
    from trainer.config import TrainConfig

    default_batch, seq_len = SHAPES.get(model, (4, 128))
    batch = batch or default_batch
    return TrainConfig(
        model=model, method=method, dtype=dtype, gradient_checkpointing=checkpointing, device="cpu",
        train_data=train, eval_data=eval_, seq_len=seq_len, batch_size=batch, max_steps=STEPS,
        report_every=batch, eval_every=None, learning_rate=1e-4, threads=2, save_model=False,
    )


def allocation_events(prof) -> list:
    """The CPU allocator's allocation and free events of a profile, in time order."""
    from torch._C._profiler import _EventType

    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocs.append(event)
        stack.extend(event.children)
    return sorted(allocs, key=lambda e: e.start_time_ns)


def measure(cfg) -> dict:
    """Train ``cfg`` under the memory profiler; the peak of live tensor bytes and the op running at that moment."""
    from torch.profiler import ProfilerActivity, profile

    import trainer.loop as loop

    loaded = []
    load_for = loop.load_for

    def capture(*args, **kwargs):
        model, tokenizer = load_for(*args, **kwargs)
        loaded.append(model)
        return model, tokenizer

    loop.load_for = capture
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = loop.train(cfg)
    finally:
        loop.load_for = load_for
    if result.status != "completed":
        raise RuntimeError(f"run did not complete: {result.status} {result.reason}")
    allocs = allocation_events(prof)
    at_peak = max(allocs, key=lambda e: e.extra_fields.total_allocated)
    handed_out = {e.extra_fields.ptr for e in allocs if e.extra_fields.alloc_size > 0}
    storages = {}
    for tensor in [*loaded[0].parameters(), *loaded[0].buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    external = sum(n for ptr, n in storages.items() if ptr not in handed_out)
    op = at_peak.parent.name if at_peak.parent is not None else "?"
    return {"peak_bytes": at_peak.extra_fields.total_allocated + external, "allocator_peak_bytes":
            at_peak.extra_fields.total_allocated, "mapped_weight_bytes": external, "peak_op": op}


# --- one training step of a small-vocabulary model: the activation terms where no logits hide them ----------------

BLOCK_VOCAB = 1024  # SmolLM2's block shape (hidden 576, MLP 1536, 9 heads, 3 KV heads), 2 blocks, a small vocabulary


def block_row(method: str, dtype: str, checkpointing: bool, folder: Path) -> dict:
    """One forward and backward pass (``token_nll``, the loop's loss) of a random 2-block Llama of SmolLM2's block
    shape with a 1,024-token vocabulary, batch 4 x 128 with padding, under the profiler: the peak of live bytes
    above what was live before the forward (weights, no optimizer yet), against the estimate's backward phases.

    With a 49k vocabulary the logits (12 bytes x batch x seq x vocab) set every training peak, and the batch-16 eval
    most run peaks; here the saved activations, a block's recomputation under checkpointing and the gradients do."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.config import TrainConfig
    from trainer.memory import estimate
    from trainer.methods import get_method
    from trainer.metrics import token_nll, weighted_loss

    config = LlamaConfig(vocab_size=BLOCK_VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    config.save_pretrained(folder)
    cfg = TrainConfig(model=str(folder), method=method, dtype=dtype, gradient_checkpointing=checkpointing,
                      batch_size=4, seq_len=128, weight_change=False, device="cpu")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    if checkpointing:  # as trainer.loop does
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = get_method(method).prepare(model, cfg)
    model.train()
    ids = torch.randint(3, BLOCK_VOCAB, (4, 128))
    mask = torch.ones(4, 128, dtype=torch.long)
    mask[1:, 64:] = 0  # padded rows: the attention mask real batches carry
    batch = {"input_ids": ids, "attention_mask": mask, "target": mask.bool()}
    marker = 777_001  # an allocation of a size nothing else has: where the step starts
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = torch.empty(marker, dtype=torch.uint8)
        nll, target, valid, _ = token_nll(model, batch, with_correct=False)
        weighted_loss(nll, target, valid, cfg.prompt_loss_weight).backward()
    del start
    allocs = allocation_events(prof)
    first = next(i for i, e in enumerate(allocs) if e.extra_fields.alloc_size == marker)
    base = allocs[first].extra_fields.total_allocated
    at_peak = max(allocs[first:], key=lambda e: e.extra_fields.total_allocated)
    est = estimate(cfg, device="cpu")
    phases = dict(est.phases)
    predicted = max(phases["backward start"], phases["backward end"])
    measured = at_peak.extra_fields.total_allocated - base
    return {"model": f"2 x SmolLM2 block, vocab {BLOCK_VOCAB}", "method": method, "dtype": dtype,
            "checkpointing": checkpointing, "batch": 4, "seq_len": 128, "estimate_bytes": predicted,
            "estimate_phase": max(("backward start", "backward end"), key=phases.get), "peak_bytes": measured,
            "peak_op": at_peak.parent.name if at_peak.parent is not None else "?", "ratio": predicted / measured}


def blocks(args) -> int:
    """The block rows in this fresh process (each measured from its own start); prints one JSON line per row."""
    from trainer.quiet import quiet_libraries

    quiet_libraries()
    for method in args.methods.split(","):
        for dtype in args.dtypes.split(","):
            for ckpt in args.checkpoint_list:
                with tempfile.TemporaryDirectory(prefix="bench-mem-block-") as tmp:
                    print(json.dumps(block_row(method, dtype, ckpt, Path(tmp))), flush=True)
    return 0


def run_blocks(args) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--blocks-one", "--methods", args.methods,
           "--dtypes", args.dtypes, "--checkpointing", args.checkpointing]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=_env())
    if proc.returncode != 0:
        raise RuntimeError(f"block rows failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def one(args) -> int:
    """One row in this fresh process; prints one JSON line."""
    from trainer.memory import estimate
    from trainer.quiet import quiet_libraries

    quiet_libraries()
    model, method, dtype, ckpt, batch = args.one
    cfg = row_config(model, method, dtype, ckpt == "1", int(batch), args.train, args.eval)
    est = estimate(cfg, device="cpu")
    row = {"model": model, "method": method, "dtype": dtype, "checkpointing": ckpt == "1", "batch": cfg.batch_size,
           "seq_len": cfg.seq_len, "estimate_bytes": est.total_bytes, "estimate": est.describe(),
           "estimate_phase": est.peak_phase, **measure(cfg)}
    row["ratio"] = row["estimate_bytes"] / row["peak_bytes"]
    print(json.dumps(row))
    return 0


def run_row(args, model: str, method: str, dtype: str, ckpt: bool, batch: int | None, train: str, eval_: str) -> dict:
    batch = batch or SHAPES.get(model, (4, 128))[0]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", model, method, dtype, str(int(ckpt)), str(batch),
           "--train", train, "--eval", eval_]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{model} {method} {dtype} checkpointing={ckpt} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(row), file=sys.stderr, flush=True)  # progress: a SmolLM2 row takes minutes
    return row


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def table(rows: list[dict]) -> list[str]:
    lines = [HEADER, HEADER_RULE]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['dtype']} | {'on' if r['checkpointing'] else 'off'} "
                     f"| {r['batch']} x {r['seq_len']} | {r['estimate_bytes'] / MIB:.1f} | {r['peak_bytes'] / MIB:.1f} "
                     f"| {r['ratio']:.2f} | {r['estimate_phase']} | {r['peak_op']} |")
    return lines


HEADER_RULE = "|" + "---|" * (HEADER.count("|") - 1)


def machine() -> str:
    import torch
    import transformers

    from scripts.bench._common import cpu_model

    return (f"machine: {platform.platform()}, CPU {cpu_model()}, {os.cpu_count()} cores; Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,smollm2-135m", help="comma-separated presets or model directories")
    p.add_argument("--methods", default="full,lora,last_layer", help="comma-separated keys of trainer.methods.METHODS")
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16")
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing: off, on or off,on")
    p.add_argument("--quick", action="store_true", help="the tiny model only (float32): the CI check of the estimate")
    p.add_argument("--out", metavar="FILE", help="also write every row (estimate parts, measured peak) as JSON here")
    p.add_argument("--jobs", type=int, default=1, help="rows measured at once, each in its own process (--quick: 2)")
    p.add_argument("--one", nargs=5, metavar=("MODEL", "METHOD", "DTYPE", "CKPT", "BATCH"), help=argparse.SUPPRESS)
    p.add_argument("--no-blocks", action="store_true", help="skip the one-step rows of the small-vocabulary model")
    p.add_argument("--blocks-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--train", help=argparse.SUPPRESS)
    p.add_argument("--eval", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.dtypes, args.jobs = "tiny", "float32", max(args.jobs, 2)
    args.checkpoint_list = [{"off": False, "on": True}[c] for c in args.checkpointing.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.one:
        return one(args)
    if args.blocks_one:
        return blocks(args)
    ckpts = args.checkpoint_list
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        train, eval_ = write_data(Path(tmp))
        todo = [(model, method, dtype, ckpt, None) for model in args.models.split(",")
                for dtype in args.dtypes.split(",") for method in args.methods.split(",") for ckpt in ckpts]
        if args.quick:  # the training step's part of the estimate, checked where it sets the peak
            todo += [("tiny", method, "float32", False, TRAINING_PEAK_BATCH) for method in ("full", "lora")]
        with ThreadPoolExecutor(args.jobs) as pool:  # rows in separate processes: side by side measures the same
            step_rows = None if args.no_blocks else pool.submit(run_blocks, args)
            rows = list(pool.map(lambda row: run_row(args, *row, train, eval_), todo))
            block_rows = step_rows.result() if step_rows else []
    print(f"command: python scripts/bench/memory_estimate.py {shlex.join(argv)}".rstrip())
    print(machine())
    print("each row: one whole train(cfg) on the CPU (3 optimizer steps, AdamW, final eval with memorization and "
          "forgetting, weight change); measured = peak live tensor bytes (torch profiler's allocator events + "
          "memory-mapped weights); ratio = estimate / measured")
    print("\n".join(table(rows)))
    if block_rows:
        print(f"\none forward and backward pass of a 2-block model of SmolLM2's block shape and a {BLOCK_VOCAB}-token "
              "vocabulary (so the logits hide nothing), above the weights: the estimate's backward phases")
        print("\n".join(table(block_rows)))
    every = rows + block_rows
    worst = max(every, key=lambda r: abs(r["ratio"] - 1))
    print(f"\nworst ratio {worst['ratio']:.2f} ({worst['model']} {worst['method']} {worst['dtype']} "
          f"checkpointing {'on' if worst['checkpointing'] else 'off'}); all within 25%: "
          f"{all(0.75 <= r['ratio'] <= 1.25 for r in every)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": argv, "machine": machine(), "rows": rows,
                                              "block_rows": block_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
