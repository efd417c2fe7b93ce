"""Trainer throughput: this project's loop against Hugging Face ``Trainer`` (tokens/s, peak RSS), per method.

    python scripts/bench/trainer_throughput.py                  # SmolLM2-135M, full/lora/last_layer, 12 steps, 3 reps
    python scripts/bench/trainer_throughput.py --quick          # tiny model, 4 steps, 1 rep: keeps the script from rotting
    python scripts/bench/trainer_throughput.py --methods lora --reps 5 --json bench.json

Both sides train the same model on the same tokenized data (``builtin:facts``,
seq_len 48, tokenized by ``trainer.data``) with the same batch size, learning
rate (constant, no warmup), gradient clipping, number of optimizer steps and
torch thread count, and the same trainable parameters: the HF model goes
through the method's own ``prepare``. HF's loss is completion-only (labels
-100 on prompt and pad tokens), like ours with ``prompt_loss_weight=0``, and
HF keeps its default optimizer for this version (printed in the header).

Time: ours is ``train_time_s`` (the steps only); HF's is ``train_runtime``,
which also starts after the optimizer is built and the model prepared.
Tokens are the real (non-pad) input tokens of the examples each side trained
on: ours replays the loop's example stream, HF's are counted on the model's
forward calls. Each measurement is a fresh subprocess (so peak RSS is one
implementation's), ours and HF interleaved, median over reps. A benchmark,
not a test: nothing is asserted about speed.
"""
from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a file: import this checkout's packages

TRAIN_DATA = "builtin:facts"  # 32 invented-fact Q/A pairs; 12 steps x 4 examples cycle them 1.5 times
EVAL_DATA = "builtin:facts-heldout:4"  # ours always evaluates at the end; kept tiny so it does not set peak RSS
SEQ_LEN = 48
LEARNING_RATE = 1e-4
HEADER = "| method | ours tok/s | HF tok/s | ratio | ours peak MB | HF peak MB | ours s/step | HF s/step |"


def _cfg(args, method: str):
    from trainer.config import TrainConfig

    return TrainConfig(
        model=args.model, method=method, train_data=TRAIN_DATA, eval_data=EVAL_DATA, seq_len=SEQ_LEN,
        learning_rate=LEARNING_RATE, batch_size=args.batch_size, max_steps=args.steps, warmup_ratio=0.0,
        scheduler="constant", threads=args.threads, device=args.device, dtype=args.dtype, eval_every=None,
        memorization=False, forgetting=False, weight_change=False, save_model=False,
    )


def _examples(model: str):
    from trainer.data import load_records, tokenize
    from trainer.models import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir(model))
    return tokenizer, tokenize(load_records(TRAIN_DATA), tokenizer, SEQ_LEN, name=TRAIN_DATA)


def one_ours(args, method: str) -> dict:
    """Train with ``trainer.train``; tokens are those of the examples its stream fed to the steps."""
    import torch

    from trainer.data import example_stream
    from trainer.loop import train

    cfg = _cfg(args, method)
    result = train(cfg)
    if result.status != "completed":
        raise RuntimeError(f"our trainer did not complete: {result.status} {result.reason}")
    _, examples = _examples(args.model)
    stream = example_stream(examples, seed=cfg.seed)  # the loop's own order: batch_size examples per step
    tokens = sum(len(next(stream).input_ids) for _ in range(args.steps * args.batch_size))
    seconds = result.metrics["train_time_s"]
    return {"tokens": tokens, "seconds": seconds, "trainable_params": result.metrics["trainable_params"],
            "threads": torch.get_num_threads(), "optimizer": "torch AdamW fused", "final_loss": result.metrics["train_loss"]}


def one_hf(args, method: str) -> dict:
    """Train the same model, data and trainable parameters with ``transformers.Trainer``."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from trainer.methods import get_method
    from trainer.models import load_model

    torch.set_num_threads(args.threads)
    cfg = _cfg(args, method)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(args.model)
    model = get_method(method).prepare(model, cfg)
    _, examples = _examples(args.model)
    seen = {"tokens": 0, "threads": 0}

    def count_tokens(module, _args, kwargs):
        if module.training:
            seen["tokens"] += int(kwargs["attention_mask"].sum())

    class LastStep(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            seen["threads"] = torch.get_num_threads()

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    targs = TrainingArguments(
        output_dir=str(Path(args.tmp) / "hf_out"), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
        logging_nan_inf_filter=False,  # the default hides NaN losses; never compare against that
        report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16", dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=_HFDataset(examples),
                      data_collator=_PadCollator(tokenizer.pad_token_id), callbacks=[LastStep()])
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    optim = getattr(targs.optim, "value", targs.optim)
    return {"tokens": seen["tokens"], "seconds": out.metrics["train_runtime"], "wall_s": wall,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "threads": seen["threads"], "optimizer": optim, "final_loss": out.metrics["train_loss"]}


class _HFDataset:
    """A map-style torch Dataset of dicts: input_ids, attention_mask, labels (-100 off the completion)."""

    def __init__(self, examples):
        self.rows = [
            {"input_ids": list(e.input_ids), "attention_mask": [1] * len(e.input_ids),
             "labels": [t if is_target else -100 for t, is_target in zip(e.input_ids, e.target)]}
            for e in examples
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class _PadCollator:
    """Right-pads a batch to its longest row, as ``trainer.data.collate`` does (labels pad with -100)."""

    def __init__(self, pad_id: int):
        self.pad = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        return {k: torch.tensor([r[k] + [fill] * (width - len(r[k])) for r in rows]) for k, fill in self.pad.items()}


def _run_one(args, impl: str, method: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", impl, method, "--model", args.model,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--device", args.device, "--dtype", args.dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} {method} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(args, method: str) -> dict:
    """Ours and HF alternately, ``reps`` times each; in --quick mode each pair runs side by side."""
    runs: dict[str, list[dict]] = {"ours": [], "hf": []}
    for _ in range(args.reps):
        if args.quick:  # a smoke run: halve the wall time, the numbers are not a measurement anyway
            with ThreadPoolExecutor(2) as pool:
                pair = dict(zip(("ours", "hf"), pool.map(lambda impl: _run_one(args, impl, method), ("ours", "hf"))))
        else:
            pair = {impl: _run_one(args, impl, method) for impl in ("ours", "hf")}
        for impl, res in pair.items():
            runs[impl].append(res)
    if runs["ours"][0]["trainable_params"] != runs["hf"][0]["trainable_params"]:
        raise RuntimeError(f"{method}: trainable parameters differ: {runs['ours'][0]['trainable_params']} "
                           f"(ours) vs {runs['hf'][0]['trainable_params']} (HF)")
    med = {impl: {key: statistics.median(r[key] for r in rs) for key in ("tok_s", "peak_mb", "s_step")}
           for impl, rs in runs.items()}
    return {"method": method, "ours": med["ours"], "hf": med["hf"], "ratio": med["ours"]["tok_s"] / med["hf"]["tok_s"],
            "trainable_params": runs["ours"][0]["trainable_params"], "hf_optimizer": runs["hf"][0]["optimizer"],
            "threads": {impl: sorted({r["threads"] for r in rs}) for impl, rs in runs.items()}, "runs": runs}


def _table(rows: list[dict]) -> list[str]:
    lines = [HEADER, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, h = r["ours"], r["hf"]
        lines.append(f"| {r['method']} | {o['tok_s']:.0f} | {h['tok_s']:.0f} | {r['ratio']:.2f} | {o['peak_mb']:.0f} | "
                     f"{h['peak_mb']:.0f} | {o['s_step']:.2f} | {h['s_step']:.2f} |")
    return lines


def _seen(rows: list[dict], impl: str) -> str:
    return ",".join(str(t) for t in sorted({t for r in rows for t in r["threads"][impl]}))


def _cpu_model() -> str:
    from scripts.bench._common import cpu_model

    return cpu_model()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a preset (smollm2-135m, tiny) or a local HF model dir")
    p.add_argument("--methods", default="full,lora,last_layer", help="comma-separated keys of trainer.methods.METHODS")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per measurement")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--reps", type=int, default=3, help="measurements per implementation and method; medians reported")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, the same for both")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quick", action="store_true", help="tiny model, 4 steps, 1 rep (a smoke run, not a measurement)")
    p.add_argument("--json", metavar="OUT", help="also write every run and the medians here")
    p.add_argument("--one", nargs=2, metavar=("IMPL", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.reps = "tiny", 4, 1
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    from trainer.methods import METHODS

    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if args.one:
        return _one(args)
    rows = [_measure(args, method) for method in args.methods.split(",")]
    import torch
    import transformers

    print(f"command: python scripts/bench/trainer_throughput.py {shlex.join(argv)}".rstrip())
    print(f"model {args.model}, {TRAIN_DATA} seq_len {SEQ_LEN}, batch {args.batch_size}, {args.steps} optimizer steps, "
          f"device {args.device} {args.dtype}, median of {args.reps}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; CPU {_cpu_model()}; "
          f"{args.threads} torch threads (seen in the runs: ours {_seen(rows, 'ours')}, HF {_seen(rows, 'hf')}); "
          f"HF optim {rows[0]['hf_optimizer']}")
    if args.quick:
        print("--quick: a smoke run (pairs run side by side); the numbers below are not a measurement")
    print("\n".join(_table(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": argv, "rows": rows}, indent=1))
    return 0


def _one(args) -> int:
    """One measurement in this fresh process; prints one JSON line."""
    import tempfile

    from trainer.quiet import quiet_libraries

    quiet_libraries()
    impl, method = args.one
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        args.tmp = tmp
        res = one_ours(args, method) if impl == "ours" else one_hf(args, method)
    res["tok_s"] = res["tokens"] / res["seconds"]
    res["s_step"] = res["seconds"] / args.steps
    res["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
