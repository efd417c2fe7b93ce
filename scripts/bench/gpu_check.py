"""GPU check (BENCHMARKS.md section 7). Part A: lr.yaml through the product (Ray Tune), trials packed by ``resources: auto``
against one per GPU, after a warm-up, the two rows in shuffled order ``--repeats`` times; only completed trials count.
Part B: LoRA, QLoRA and full fine-tuning of random-init Llama-3.2-1B and -3.1-8B sizes through ``trainer.loop.train``: the
memory estimate against the measured peak, and tokens/s beside torchtune's published figures.

    python scripts/bench/gpu_check.py --out gpu_check.md --budget-s 480   # a CUDA machine (scripts/bench/gpu_check.sh)
    python scripts/bench/gpu_check.py --part b | --part a --repeats 3 | --quick
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: this checkout's packages

from scripts.bench._harness import ROOT, Report, answer, child, fmt, gpus, options, parser, run_sweep, spread, warm_store

HEADER_A = ["row", "resources", "runs", "wall s", "trials completed / run", "completed trials/hour", "mean GPU busy %",
            "most trials at once", "GPU share a trial", "largest peak GiB", "its estimate GiB"]
A_OVERRIDES = ["search.refine=null", "space.batch_size=[8]", "tracking.experiment=gpu-check"]  # 12 trials, the same in both rows
A_QUICK = ["space.method=[lora]", "data.train=builtin:facts:8", "train.epochs=1", "train.memorization=false",
           "train.forgetting=false", "train.eval_every=8", "failure.checkpoint_every=0", "tracking.experiment=gpu-check"]
LLAMA = {  # published dimensions; no weights are read
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)}
B_ROWS = [("lora", {"method": "lora"}), ("qlora", {"method": "lora", "quantization": "4bit"}), ("full", {"method": "full"})]
B_8BIT = ("full", {"method": "full", "optimizer": "adamw_8bit"})
# torchtune README, "Memory and training speed": Llama-3.1-8B, 1x RTX 4090, batch 2 packed to 2048, torch.compile
TORCHTUNE = {"lora": "16.2 GiB, 3083 tok/s", "qlora": "7.4 GiB, 2413 tok/s", "full": "18.9 GiB, 1650 tok/s"}


class GpuBusy(threading.Thread):
    """Mean GPU busy % (all GPUs, nvidia-smi every 0.5 s) while in the ``with`` block; None without a GPU."""

    def __init__(self, on: bool):
        super().__init__(daemon=True)
        self.on, self.samples, self.stop = on, [], threading.Event()

    def __enter__(self):
        return self.start() or self if self.on else self

    def __exit__(self, *exc):
        self.stop.set()

    def run(self):
        while not self.stop.wait(0.5):
            with contextlib.suppress(Exception):
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(statistics.mean(float(v) for v in out.split()))


def a_sweep(spec: str, overrides: list[str], tmp: Path, tag: str, on_gpu: bool, left: float) -> dict:
    """One sweep command: wall (launch to exit), GPU busy, and what its trials.json says; completed trials only count."""
    name, out = f"gpucheck-{tag}", tmp / "sweeps"
    with GpuBusy(on_gpu) as busy:
        try:
            t = run_sweep(spec, [f"name={name}", f"output_dir={out}", "tracking.uri=null", *overrides],
                          {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}, timeout=max(left, 1.0))
        except RuntimeError as exc:
            return {"error": "the sweep failed: " + str(exc).splitlines()[0][:200]}
    if t["stopped_early"] or not (out / name / "trials.json").is_file():
        return {"error": "stopped by --budget-s" if t["stopped_early"] else "no trials.json"}
    finals = [r.get("final") or {} for r in json.loads((out / name / "trials.json").read_text())]
    completed = sum(f.get("status") == "completed" for f in finals)
    peaks = [(f["peak_mem_gib"], f.get("mem_estimate_gib")) for f in finals if f.get("peak_mem_gib") is not None]
    now = most = 0
    for _, step in sorted(e for f in finals if f.get("start_unix") and f.get("end_unix") for e in ((f["start_unix"], 1), (f["end_unix"], -1))):
        now += step
        most = max(most, now)
    return {"wall_s": t["wall_s"], "trials": len(finals), "completed": completed, "per_hour": completed * 3600 / t["wall_s"],
            "gpu_busy": statistics.mean(busy.samples) if busy.samples else None, "at_once": most or None, "shares": sorted({f["gpu_share"] for f in finals if f.get("gpu_share")}),
            "peak_gib": max(peaks)[0] if peaks else None, "estimate_gib": max(peaks)[1] if peaks else None}


def part_a(args, rep: Report, on_gpu: bool, end: float) -> dict:
    rep("", f"## Part A: packing through Ray Tune ({Path(args.spec).name})", "")
    missing = [m for m in ("ray", "optuna", "mlflow") if importlib.util.find_spec(m) is None]
    if missing:
        rep(f"not run: {', '.join(missing)} not importable here (see gpu_check.sh)")
        return {"skipped": missing}
    spec, base = str(ROOT / args.spec), (A_QUICK if args.quick else A_OVERRIDES) + args.override
    second = ["resources={gpu: 1}"] if on_gpu else ["resources=auto", "search.max_concurrent=1"]
    rows = {"packed": ("resources: auto", ["resources=auto"]),
            ("one per GPU" if on_gpu else "one at a time"): ("resources: {gpu: 1}" if on_gpu else "max_concurrent 1 (no GPU)", second)}
    rep(f"overrides on both rows: `{' '.join(base)}`; " + "; ".join(f"{r} = `{' '.join(ov)}`" for r, (_, ov) in rows.items()))
    runs, rng, last = [], random.Random(args.seed), 0.0
    with tempfile.TemporaryDirectory(prefix="gpu-check-a-") as tmp_name:
        tmp = Path(tmp_name)
        warm_store(f"sqlite:///{tmp / 'mlflow.db'}")
        if args.warmup:  # model cache, the base model's cached evaluation, imports: discarded
            warm = a_sweep(spec, [*base, "resources=auto", "space.method=[lora]"], tmp, "warmup", on_gpu, end - time.time())
            rep("warm-up (discarded): " + (warm.get("error") or f"{warm['wall_s']:.1f} s"))
        for repeat in range(1, args.repeats + 1):
            if last and end - time.time() < 1.1 * last:
                rep(f"repeats stopped after {repeat - 1}: the next would not end within --budget-s")
                break
            t0, order = time.time(), list(rows)
            rng.shuffle(order)
            for row in order:
                r = {"repeat": repeat, "row": row, **a_sweep(spec, [*base, *rows[row][1]], tmp, f"{row[:3]}-{repeat}", on_gpu, end - time.time())}
                runs.append(r)
                rep(f"repeat {repeat}, {row}: " + (r["error"] if "error" in r else f"{r['wall_s']:.1f} s, {r['completed']} of "
                                                   f"{r['trials']} completed, GPU busy {fmt(r['gpu_busy'], 0)}%"))
            last = time.time() - t0
    rep("")
    table, per_hour = [], {}
    for row, (asks, _) in rows.items():
        done = [r for r in runs if r["row"] == row and "error" not in r]
        per_hour[row] = [r["per_hour"] for r in done]
        at_once = sorted({r["at_once"] for r in done if r["at_once"]}) or ["n/a"]
        table.append([row, asks, len(done), spread([r["wall_s"] for r in done]), f"{min((r['completed'] for r in done), default=0)} of "
                      f"{max((r['trials'] for r in done), default=0)}", spread(per_hour[row], 0), spread([r["gpu_busy"] for r in done], 0),
                      "-".join(map(str, sorted({at_once[0], at_once[-1]}))), ", ".join(f"{x:g}" for x in sorted({x for r in done for x in r["shares"]})) or "-",
                      spread([r["peak_gib"] for r in done], 2), spread([r["estimate_gib"] for r in done], 2)])
    rep.table(HEADER_A, table, "median (min-max) over the repeats:")
    first, second = rows
    pairs = [a["per_hour"] / b["per_hour"] for a in runs for b in runs if a["repeat"] == b["repeat"] and a["row"] == first
             and b["row"] == second and "error" not in a and "error" not in b]
    if pairs:
        rep(f"{first} / {second}, completed trials per hour: **{statistics.median(per_hour[first]) / statistics.median(per_hour[second]):.2f}x**"
            f" (per repeat {min(pairs):.2f}x-{max(pairs):.2f}x)")
    return {"runs": runs, "overrides": base}


def write_data(folder: Path, tokenizer, seq_len: int, n: int) -> tuple[str, str]:
    """Prompt/completion records of random whole words of the vocabulary, each about ``seq_len`` tokens, and a short eval."""
    rng = random.Random(0)
    words = sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("\u0120") and t[1:].isalpha() and t[1:].isascii() and len(t) > 3)

    def record(prompt_words: int, tokens: int) -> str:
        prompt = " ".join(rng.choices(words, k=prompt_words)) + "\n"
        ids = tokenizer(" ".join(rng.choices(words, k=tokens)), add_special_tokens=False)["input_ids"]
        budget = tokens - len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) - 2  # EOS, maybe BOS
        return json.dumps({"prompt": prompt, "completion": tokenizer.decode(ids[:max(1, budget)])}) + "\n"

    (folder / "train.jsonl").write_text("".join(record(min(64, seq_len // 8), seq_len) for _ in range(n)))
    (folder / "eval.jsonl").write_text("".join(record(8, 24) for _ in range(2)))
    return str(folder / "train.jsonl"), str(folder / "eval.jsonl")


def build(payload: dict) -> dict:
    """(A child process.) A random-init bf16 model from a config, saved with SmolLM2's tokenizer (the vocabulary as published)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from trainer.models import ensure_preset, load_tokenizer
    tok = load_tokenizer(ensure_preset("smollm2-135m"))
    config = (AutoConfig.from_pretrained(ensure_preset("tiny"), local_files_only=True) if payload["dims"] is None else
              LlamaConfig(**payload["dims"], max_position_embeddings=131072, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    torch.manual_seed(0)
    with torch.device(payload["device"]):  # random init of 8B parameters: seconds on a GPU, minutes on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(payload["dir"])
    tok.save_pretrained(payload["dir"])
    return {"params": sum(p.numel() for p in model.parameters())}


def train_row(payload: dict) -> dict:
    """(A child process.) One run: status, peak memory, tokens/s and s/step after step 1 (the trainer's per-step reports)."""
    from trainer.config import TrainConfig
    from trainer.loop import train
    cfg = TrainConfig(**payload)
    reports: list[dict] = []
    result = train(cfg, lambda m, checkpoint=None: reports.append(dict(m)))
    steps = [r for r in reports if r.get("step") is not None]
    dts = [(b["train_time_s"] - a["train_time_s"], b["tokens_per_s"]) for a, b in zip(steps, steps[1:])]
    seconds = sum(dt for dt, _ in dts)
    return {"status": result.status, "reason": result.reason, "s_per_step": seconds / (len(steps) - 1) if seconds else None,
            "peak_gib": max((r["peak_mem_gib"] for r in reports if r.get("peak_mem_gib")), default=None),
            "tokens_per_s": sum(dt * v for dt, v in dts) / seconds if seconds else None}


def _call(args, fn, payload: dict, end: float) -> dict:
    return fn(payload) if args.quick else child(__file__, [f"--{fn.__name__}", json.dumps(payload)], max(end - time.time(), 1))


def part_b(args, rep: Report, on_gpu: bool, end: float) -> dict:
    from trainer.config import TrainConfig
    from trainer.memory import estimate
    from trainer.models import ensure_preset, load_tokenizer
    from trainer.quiet import quiet_libraries
    quiet_libraries()  # --quick trains in this process
    warnings.filterwarnings("ignore", message=".*an autograd kernel was not registered.*")  # bitsandbytes on the CPU
    device, gpu_gib = ("cuda", gpus()[0]["memory_gib"]) if on_gpu else ("cpu", None)
    rep("", f"## Part B: real sizes (bf16, gradient checkpointing, batch {args.batch_size} x {args.seq_len}, {args.steps} steps, {device})", "")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-b-") as tmp_name:
        tmp = Path(tmp_name)
        train_path, eval_path = write_data(tmp, load_tokenizer(ensure_preset("smollm2-135m")), args.seq_len, args.steps * args.batch_size + 2)
        base = dict(dtype="bfloat16", gradient_checkpointing=True, device=device, batch_size=args.batch_size, seq_len=args.seq_len,
                    max_steps=args.steps, learning_rate=1e-5, warmup_ratio=0.0, scheduler="constant", report_every=args.batch_size,
                    eval_every=None, memorization=False, forgetting=False, weight_change=False, train_data=train_path,
                    eval_data=eval_path, save_model=False, seed=0)
        plan = [("tiny", None, B_ROWS)] if args.quick else [
            (m, LLAMA[m], B_ROWS + ([B_8BIT] if m == "llama-3.1-8b" else [])) for m in args.models.split(",")]
        for model, dims, labels in plan:
            try:  # a fresh process each, for its own peak: an out-of-memory or a timeout ends that step only (--quick: here)
                built = _call(args, build, {"dims": dims, "dir": str(tmp / model), "device": device}, end)
                rep(f"{model}: {built['params'] / 1e6:,.0f} M parameters")
            except Exception as exc:
                rows += [{"model": model, "label": lb, "settings": st, "status": f"not built: {str(exc)[-200:]}"} for lb, st in labels]
                continue
            for label, settings in labels:
                cfg = TrainConfig(model=str(tmp / model), **base, **settings)
                row = {"model": model, "label": label, "settings": settings, "estimate_gib": estimate(cfg, device=device).total_gib}
                if gpu_gib and row["estimate_gib"] > gpu_gib:
                    row["status"] = f"skipped: estimate {row['estimate_gib']:.1f} GiB > the GPU's {gpu_gib:.1f}"
                elif end - time.time() < 30:
                    row["status"] = "not run: --budget-s spent"
                else:
                    try:
                        row.update(_call(args, train_row, cfg.model_dump(mode="json"), end))
                    except Exception as exc:
                        row["status"] = f"crashed: {str(exc).strip().splitlines()[-1][:200]}"
                rows.append(row)
            shutil.rmtree(tmp / model, ignore_errors=True)  # 16 GB for the 8B: one model on disk at a time
    rep.table(["model", "method", "optimizer", "status", "estimate GiB", "measured peak GiB", "peak / estimate", "tokens/s after step 1",
               "s/step after step 1", "torchtune, Llama-3.1-8B, 1 GPU"],
              [[r["model"], r["label"], r["settings"].get("optimizer", "adamw"), r["status"], fmt(r.get("estimate_gib"), 2),
                fmt(r.get("peak_gib"), 2), f"{r['peak_gib'] / r['estimate_gib']:.2f}" if r.get("peak_gib") else "n/a",
                fmt(r.get("tokens_per_s"), 0), fmt(r.get("s_per_step"), 3), TORCHTUNE.get(r["label"], "-") if "8b" in r["model"] else "-"]
               for r in rows])
    rep("torchtune: torch.compile, chunked cross-entropy, and for full fine-tuning paged 8-bit AdamW stepped in the backward pass; "
        "ours: none of these (the whole float32 logits)")
    return {"rows": rows, "device": device}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--part", choices=("a", "b", "both"), default="both", help="with both, part B runs first")
    p.add_argument("--budget-s", type=float, help="no repeat, row or build starts that would not end in time")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="part A: for both rows")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    options(p, spec="search_spaces/lr.yaml", repeats=3, seed=0, models="llama-3.2-1b,llama-3.1-8b", batch_size=2, seq_len=2048, steps=6)
    p.add_argument("--train_row", help=argparse.SUPPRESS)
    p.add_argument("--build", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.train_row or args.build:
        from trainer.quiet import quiet_libraries
        quiet_libraries()
        return answer(train_row(json.loads(args.train_row)) if args.train_row else build(json.loads(args.build)))
    if args.quick:
        args.spec, args.repeats, args.warmup, args.batch_size, args.seq_len, args.steps = "search_spaces/smoke.yaml", 1, False, 2, 128, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the models are built here
    rep, on_gpu = Report("gpu_check.py", argv, args.quick, args.out), bool(gpus()) and not args.quick
    end = time.time() + (args.budget_s or 1e9)
    results = {"b": part_b(args, rep, on_gpu, end)} if args.part in ("b", "both") else {}
    if args.part in ("a", "both"):
        results["a"] = part_a(args, rep, on_gpu, end)
    rep.save(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
