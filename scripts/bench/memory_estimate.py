"""Memory estimate (BENCHMARKS.md section 8): ``trainer.memory.estimate(cfg)`` against the peak of live tensor bytes of a
whole ``train(cfg)`` run (torch profiler's CPU allocator events, plus the weights safetensors maps), each in a fresh process;
and one training step of a 2-block, 1,024-vocabulary model, where the logits hide no activation term.

    python scripts/bench/memory_estimate.py [--models tiny,smollm2-135m] [--dtypes float32,bfloat16] [--jobs 2] [--quick] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: this checkout's packages

from scripts.bench._harness import Report, answer, child, options, parser

MIB = 1024**2
HEADER = ["model", "method", "dtype", "checkpointing", "batch x seq", "estimate MiB", "measured MiB", "ratio", "estimated peak",
          "measured peak at"]
SHAPES = {"tiny": (8, 64), "smollm2-135m": (4, 128)}  # (batch, seq_len)
TRAINING_PEAK_BATCH = 16  # --quick: the tiny model's training step sets the peak at this batch (else an eval batch does)
BLOCK_VOCAB = 1024
WORDS = "river stone lantern copper meadow violin harbor cedar orbit marble thunder basil quartz falcon ember".split()


def write_data(folder: Path, n: int = 16) -> tuple[str, str]:
    """Records alternately far longer than any seq_len here and a third as long: every batch padded to seq_len, masked."""
    rng, paths = random.Random(0), []
    for split in ("train", "eval"):
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"Record {split} {i}:", "completion": " " + " ".join(
            rng.choice(WORDS) for _ in range(200 if i % 2 == 0 else 12))}) + "\n" for i in range(n)))
        paths.append(str(path))
    return paths[0], paths[1]


def allocation_events(prof) -> list:
    from torch._C._profiler import _EventType
    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocs.append(event)
        stack.extend(event.children)
    return sorted(allocs, key=lambda e: e.start_time_ns)


def _op(event) -> str:
    return event.parent.name if event.parent is not None else "?"


def run_row(model: str, method: str, dtype: str, ckpt: bool, batch: int, train: str, eval_: str) -> dict:
    """(In a fresh process.) One whole run under the memory profiler, next to its estimate."""
    from torch.profiler import ProfilerActivity, profile

    import trainer.loop as loop
    from trainer.config import TrainConfig
    from trainer.memory import estimate
    cfg = TrainConfig(model=model, method=method, dtype=dtype, gradient_checkpointing=ckpt, device="cpu", train_data=train,
                      eval_data=eval_, seq_len=SHAPES.get(model, (4, 128))[1], batch_size=batch, max_steps=3,
                      report_every=batch, eval_every=None, learning_rate=1e-4, threads=2, save_model=False)
    est = estimate(cfg, device="cpu")
    loaded, load_for = [], loop.load_for
    loop.load_for = lambda *a, **k: loaded.append(load_for(*a, **k)) or loaded[-1]  # keep the model: its mapped weights
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
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*loaded[0][0].parameters(), *loaded[0][0].buffers()]}
    peak = at_peak.extra_fields.total_allocated + sum(n for ptr, n in storages.items() if ptr not in handed_out)
    return {"model": model, "method": method, "dtype": dtype, "checkpointing": ckpt, "batch": batch, "seq_len": cfg.seq_len,
            "estimate_bytes": est.total_bytes, "estimate_phase": est.peak_phase, "estimate": est.describe(),
            "peak_bytes": peak, "peak_op": _op(at_peak), "ratio": est.total_bytes / peak}


def block_row(method: str, dtype: str, ckpt: bool, folder: Path) -> dict:
    """One forward and backward pass (the loop's loss) of a random 2-block Llama of SmolLM2's block shape, batch 4 x 128
    with padding: the peak of live bytes above the weights, against the estimate's backward phases."""
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
    cfg = TrainConfig(model=str(folder), method=method, dtype=dtype, gradient_checkpointing=ckpt, batch_size=4, seq_len=128,
                      weight_change=False, device="cpu")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    if ckpt:  # as trainer.loop does
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = get_method(method).prepare(model, cfg)
    model.train()
    mask = torch.ones(4, 128, dtype=torch.long)
    mask[1:, 64:] = 0
    batch = {"input_ids": torch.randint(3, BLOCK_VOCAB, (4, 128)), "attention_mask": mask, "target": mask.bool()}
    marker = 777_001  # an allocation of a size nothing else has: where the step starts
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = torch.empty(marker, dtype=torch.uint8)
        nll, target, valid, _ = token_nll(model, batch, with_correct=False)
        weighted_loss(nll, target, valid, cfg.prompt_loss_weight).backward()
    del start
    allocs = allocation_events(prof)
    first = next(i for i, e in enumerate(allocs) if e.extra_fields.alloc_size == marker)
    at_peak = max(allocs[first:], key=lambda e: e.extra_fields.total_allocated)
    phases = dict(estimate(cfg, device="cpu").phases)
    phase = max(("backward start", "backward end"), key=phases.get)
    measured = at_peak.extra_fields.total_allocated - allocs[first].extra_fields.total_allocated
    return {"model": f"2 x SmolLM2 block, vocab {BLOCK_VOCAB}", "method": method, "dtype": dtype, "checkpointing": ckpt,
            "batch": 4, "seq_len": 128, "estimate_bytes": phases[phase], "estimate_phase": phase, "peak_bytes": measured,
            "peak_op": _op(at_peak), "ratio": phases[phase] / measured}


def _rows(rows: list[dict]) -> list[list]:
    return [[r["model"], r["method"], r["dtype"], "on" if r["checkpointing"] else "off", f"{r['batch']} x {r['seq_len']}",
             f"{r['estimate_bytes'] / MIB:.1f}", f"{r['peak_bytes'] / MIB:.1f}", f"{r['ratio']:.2f}", r["estimate_phase"],
             r["peak_op"]] for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    options(p, models="tiny,smollm2-135m", methods="full,lora,last_layer", dtypes="float32", checkpointing="off,on", jobs=1)
    p.add_argument("--no-blocks", action="store_true", help="skip the one-step rows of the small-vocabulary model")
    p.add_argument("--one", nargs=7, help=argparse.SUPPRESS)
    p.add_argument("--blocks", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ckpts = [{"off": False, "on": True}[c] for c in args.checkpointing.split(",")]
    if args.quick:
        args.models, args.dtypes, args.jobs = "tiny", "float32", max(args.jobs, 2)
    from trainer.quiet import quiet_libraries
    if args.one:
        quiet_libraries()
        model, method, dtype, ckpt, batch, train, eval_ = args.one
        return answer(run_row(model, method, dtype, ckpt == "1", int(batch), train, eval_))
    if args.blocks:
        quiet_libraries()
        with tempfile.TemporaryDirectory(prefix="bench-mem-block-") as tmp:
            return answer({"rows": [block_row(m, d, c, Path(tmp) / f"{m}-{d}-{c}") for m in args.methods.split(",")
                                    for d in args.dtypes.split(",") for c in ckpts]})
    rep = Report("memory_estimate.py", argv, args.quick, args.out)
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        train, eval_ = write_data(Path(tmp))
        todo = [(m, meth, d, c, SHAPES.get(m, (4, 128))[0]) for m in args.models.split(",") for d in args.dtypes.split(",")
                for meth in args.methods.split(",") for c in ckpts]
        if args.quick:
            todo += [("tiny", meth, "float32", False, TRAINING_PEAK_BATCH) for meth in ("full", "lora")]
        with ThreadPoolExecutor(args.jobs) as pool:  # each row its own process: side by side they measure the same
            blocks = None if args.no_blocks else pool.submit(child, __file__, ["--blocks", "--methods", args.methods,
                                                                                "--dtypes", args.dtypes, "--checkpointing", args.checkpointing])
            rows = list(pool.map(lambda r: child(__file__, ["--one", *map(str, r[:3]), str(int(r[3])), str(r[4]), train, eval_]), todo))
            block_rows = blocks.result()["rows"] if blocks else []
    rep.table(HEADER, _rows(rows), "Whole runs (3 AdamW steps, final eval with memorization and forgetting, weight change); "
                                   "ratio = estimate / measured:")
    if block_rows:
        rep.table(HEADER, _rows(block_rows), "One forward and backward pass above the weights, against the estimate's backward phases:")
    worst = max(rows + block_rows, key=lambda r: abs(r["ratio"] - 1))
    rep(f"worst ratio {worst['ratio']:.2f} ({worst['model']} {worst['method']} {worst['dtype']}); all within 25%: "
        f"{all(0.75 <= r['ratio'] <= 1.25 for r in rows + block_rows)}")
    rep.save({"rows": rows, "block_rows": block_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
