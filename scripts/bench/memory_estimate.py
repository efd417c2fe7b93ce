"""Memory estimate (BENCHMARKS.md section 8; ``real_sizes`` is gpu_check.py's part B, section 7): ``trainer.memory``'s
estimate against measured peaks."""
import contextlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: this checkout's packages

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import trainer.loop as loop
from scripts.bench._harness import Report, child, cli, entry, fmt, gpus
from trainer.config import TrainConfig
from trainer.memory import estimate
from trainer.methods import get_method
from trainer.metrics import token_nll, weighted_loss
from trainer.models import ensure_preset, load_tokenizer

MIB, GIB = 1024**2, 1024**3
HEADER = ["model", "method", "dtype", "checkpointing", "batch x seq", "estimate MiB", "measured MiB", "ratio", "estimated peak",
          "measured peak at"]
SHAPES = {"tiny": (8, 64), "smollm2-135m": (4, 128)}  # (batch, seq_len)
TRAINING_PEAK_BATCH = 16  # --quick: the tiny model's training step sets the peak at this batch (else an eval batch does)
BLOCK_VOCAB = 1024
LLAMA3 = dict(num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)  # published dimensions; no weights are read
LLAMA = {"llama-3.2-1b": dict(LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, tie_word_embeddings=True),
         "llama-3.1-8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, tie_word_embeddings=False)}
SETTINGS = {"lora": {"method": "lora"}, "qlora": {"method": "lora", "quantization": "4bit"}, "full": {"method": "full"},
            "full-8bit": {"method": "full", "optimizer": "adamw_8bit"}}  # part B's rows
B_HEADER = ["model", "method", "optimizer", "status", "estimate GiB", "measured peak GiB", "peak / estimate",
            "tokens/s after step 1", "s/step after step 1", "torchtune, Llama-3.1-8B, 1 GPU"]
# torchtune README, "Memory and training speed": Llama-3.1-8B, 1x RTX 4090, batch 2 packed to 2048, torch.compile
TORCHTUNE = {"lora": "16.2 GiB, 3083 tok/s", "qlora": "7.4 GiB, 2413 tok/s", "full": "18.9 GiB, 1650 tok/s"}
WORDS = "river stone lantern copper meadow violin harbor cedar orbit marble thunder basil quartz falcon ember".split()


def write_data(folder: Path, n: int = 16, words: tuple = (200, 12), eval_words: tuple | None = None) -> tuple[str, str]:
    """Records alternately ``words[0]`` and ``words[1]`` words long (section 8: far longer than any seq_len here, and a
    third as long: every batch padded to seq_len, masked); the eval file's, ``eval_words`` (default: the same)."""
    rng = random.Random(0)
    for split, lengths in (("train", words), ("eval", eval_words or words)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": f"Record {split} {i}:", "completion": " " + " ".join(
            rng.choice(WORDS) for _ in range(lengths[i % 2]))}) + "\n" for i in range(n)))
    return str(folder / "train.jsonl"), str(folder / "eval.jsonl")


def allocations(prof, since: int = 0) -> tuple[list, int, str]:
    """The profiler's CPU allocations in order, from the first of size ``since`` (0: all); their highest running total
    and the op that allocated it."""
    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == torch._C._profiler._EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocs.append(event)
        stack.extend(event.children)
    allocs = sorted(allocs, key=lambda e: e.start_time_ns)
    allocs = allocs[next(i for i, e in enumerate(allocs) if e.extra_fields.alloc_size == since):] if since else allocs
    top = max(allocs, key=lambda e: e.extra_fields.total_allocated)
    return allocs, top.extra_fields.total_allocated, top.parent.name if top.parent is not None else "?"


def run_row(cfg: dict) -> dict:
    """(In a fresh process.) One whole run next to its estimate, and its tokens/s and s/step after step 1 (its reports).
    The measured peak: on the CPU, the memory profiler's peak of live tensor bytes plus the weights safetensors maps from
    the file (which the allocator never hands out); on a GPU, CUDA's peak as the run reports it."""
    cfg, reports = TrainConfig(**cfg), []
    est, loaded, load_for, cpu = estimate(cfg, device=cfg.device), [], loop.load_for, cfg.device == "cpu"
    # keep the model: its mapped weights (this process does nothing else, so the patch stays)
    loop.load_for = lambda *a, **k: loaded.append(load_for(*a, **k)) or loaded[-1]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) if cpu else contextlib.nullcontext() as prof:
        result = loop.train(cfg, lambda m, checkpoint=None: reports.append(dict(m)))
    steps = [r for r in reports if r.get("step") is not None]
    dts = [(b["train_time_s"] - a["train_time_s"], b["tokens_per_s"]) for a, b in zip(steps, steps[1:])]
    seconds = sum(dt for dt, _ in dts)
    row = {"status": result.status, "reason": result.reason, "estimate_bytes": est.total_bytes, "estimate_phase": est.peak_phase,
           "estimate": est.describe(), "s_per_step": seconds / len(dts) if seconds else None,
           "tokens_per_s": sum(dt * v for dt, v in dts) / seconds if seconds else None}
    if cpu and result.status == "completed":
        allocs, at_peak, row["peak_op"] = allocations(prof)
        handed_out = {e.extra_fields.ptr for e in allocs if e.extra_fields.alloc_size > 0}
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in [*loaded[0][0].parameters(), *loaded[0][0].buffers()]}
        row["peak_bytes"] = at_peak + sum(n for ptr, n in storages.items() if ptr not in handed_out)
    elif peaks := [r["peak_mem_gib"] for r in reports if r.get("peak_mem_gib")]:
        row.update(peak_bytes=max(peaks) * GIB, peak_op="-")
    return row


def measure(todo: list[tuple[str, str, TrainConfig]], jobs: int, end: float = math.inf, gpu_gib: float | None = None) -> list:
    """``run_row`` of each (model, label, config), each in a fresh process (its own peak: an out-of-memory or a timeout
    ends that row only), ``jobs`` at a time. Not run: a row whose estimate exceeds the GPU, or once --budget-s is spent."""
    def one(item) -> dict:
        model, label, cfg = item
        row = {"model": model, "label": label, "method": cfg.method, "optimizer": cfg.optimizer, "dtype": cfg.dtype,
               "checkpointing": cfg.gradient_checkpointing, "batch": cfg.batch_size, "seq_len": cfg.seq_len}
        if gpu_gib and (gib := estimate(cfg, device=cfg.device).total_gib) > gpu_gib:
            return {**row, "status": f"skipped: estimate {gib:.1f} GiB > the GPU's {gpu_gib:.1f}"}
        if end - time.time() < 30:
            return {**row, "status": "not run: --budget-s spent"}
        try:
            row.update(child(__file__, "run_row", cfg.model_dump(mode="json"), timeout=min(end - time.time(), 3600)))
        except Exception as exc:
            row["status"] = f"crashed: {str(exc).strip().splitlines()[-1][:200]}"
        return {**row, "ratio": row["estimate_bytes"] / row["peak_bytes"] if row.get("peak_bytes") else None}
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, todo))


def block_rows(methods: list[str], dtypes: list[str], ckpts: list[bool]) -> dict:
    """(A fresh process.) For each method, dtype and checkpointing: one forward and backward pass (the loop's loss) of a
    random 2-block Llama of SmolLM2's block shape, batch 4 x 128 with padding: the peak of live bytes above the weights,
    against the estimate's backward phases."""
    config, rows = LlamaConfig(vocab_size=BLOCK_VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                               num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True), []
    mask = torch.ones(4, 128, dtype=torch.long)
    mask[1:, 64:] = 0
    with tempfile.TemporaryDirectory(prefix="bench-mem-block-") as folder:
        config.save_pretrained(folder)
        for method, dtype, ckpt in ((m, d, c) for m in methods for d in dtypes for c in ckpts):
            cfg = TrainConfig(model=folder, method=method, dtype=dtype, gradient_checkpointing=ckpt, batch_size=4, seq_len=128,
                              weight_change=False, device="cpu")
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).to(getattr(torch, dtype))
            if ckpt:
                loop.enable_checkpointing(model)
            model = get_method(method).prepare(model, cfg).train()
            batch = {"input_ids": torch.randint(3, BLOCK_VOCAB, (4, 128)), "attention_mask": mask, "target": mask.bool()}
            marker = 777_001  # an allocation of a size nothing else has: where the step starts
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                start = torch.empty(marker, dtype=torch.uint8)
                nll, target, valid, _ = token_nll(model, batch, with_correct=False)
                weighted_loss(nll, target, valid, cfg.prompt_loss_weight).backward()
            del start, model, nll, target, valid  # all of this row's tensors (nll's graph holds the parameters), before the next
            allocs, at_peak, op = allocations(prof, since=marker)
            phases = dict(estimate(cfg, device="cpu").phases)
            phase = max(("backward start", "backward end"), key=phases.get)
            peak = at_peak - allocs[0].extra_fields.total_allocated
            rows.append({"model": f"2 x SmolLM2 block, vocab {BLOCK_VOCAB}", "method": method, "dtype": dtype,
                         "checkpointing": ckpt, "batch": 4, "seq_len": 128, "estimate_bytes": phases[phase],
                         "estimate_phase": phase, "peak_bytes": peak, "peak_op": op, "ratio": phases[phase] / peak})
    return {"rows": rows}


def _rows(rows: list[dict]) -> list[list]:
    return [[r["model"], r["method"], r["dtype"], "on" if r["checkpointing"] else "off", f"{r['batch']} x {r['seq_len']}",
             f"{r['estimate_bytes'] / MIB:.1f}", f"{r['peak_bytes'] / MIB:.1f}", f"{r['ratio']:.2f}", r["estimate_phase"],
             r["peak_op"]] for r in rows]


def build(dims: dict | None, folder: str, device: str) -> dict:
    """(A fresh process.) A random-init bf16 model of ``dims`` (None: the tiny model's config), saved with SmolLM2's
    tokenizer (the vocabulary as published)."""
    tok = load_tokenizer(ensure_preset("smollm2-135m"))
    config = (AutoConfig.from_pretrained(ensure_preset("tiny"), local_files_only=True) if dims is None else
              LlamaConfig(**dims, max_position_embeddings=131072, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    torch.manual_seed(0)
    with torch.device(device):  # random init of 8B parameters: seconds on a GPU, minutes on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"params": sum(p.numel() for p in model.parameters())}


def real_sizes(args, rep: Report, on_gpu: bool, end: float) -> dict:
    """gpu_check.py's part B: random-init models of real sizes, each built in a fresh process, then ``measure``d."""
    device, gpu_gib = ("cuda", gpus()[0]["memory_gib"]) if on_gpu else ("cpu", None)
    rep("", f"## Part B: real sizes (bf16, gradient checkpointing, batch {args.batch_size} x {args.seq_len}, {args.steps} steps, "
            f"{device})", "")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-b-") as tmp_name:
        tmp = Path(tmp_name)
        # every record past seq_len (each word a token or more): full sequences; the final eval on short ones
        train, eval_ = write_data(tmp, args.steps * args.batch_size + 2, (args.seq_len,) * 2, (8, 8))
        base = dict(dtype="bfloat16", gradient_checkpointing=True, device=device, batch_size=args.batch_size, seed=0,
                    seq_len=args.seq_len, max_steps=args.steps, learning_rate=1e-5, warmup_ratio=0.0, scheduler="constant",
                    eval_every=None, report_every=args.batch_size, memorization=False, forgetting=False, weight_change=False,
                    train_data=train, eval_data=eval_, save_model=False)
        for model in ["tiny"] if args.quick else args.models.split(","):
            labels = ["lora", "qlora", "full"] + (["full-8bit"] if model == "llama-3.1-8b" else [])
            try:
                built = child(__file__, "build", LLAMA.get(model), str(tmp / model), device,
                              timeout=min(max(end - time.time(), 1), 3600))  # within --budget-s
                rep(f"{model}: {built['params'] / 1e6:,.0f} M parameters")
            except Exception as exc:
                rows += [dict(model=model, label=lb, status=f"not built: {str(exc)[-200:]}") for lb in labels]
                continue
            rows += measure([(model, lb, TrainConfig(model=str(tmp / model), **base, **SETTINGS[lb])) for lb in labels], 1,
                            end, gpu_gib)
            shutil.rmtree(tmp / model, ignore_errors=True)  # 16 GB for the 8B: one model on disk at a time
    rep.table(B_HEADER, [[r["model"], r["label"], r.get("optimizer", "adamw"), r["status"],
                          *(fmt(r[k] / GIB if r.get(k) else None, 2) for k in ("estimate_bytes", "peak_bytes")),
                          fmt(r.get("ratio") and 1 / r["ratio"], 2),
                          fmt(r.get("tokens_per_s"), 0), fmt(r.get("s_per_step"), 3),
                          TORCHTUNE.get(r["label"].split("-")[0], "-") if "8b" in r["model"] else "-"] for r in rows])
    rep("torchtune: torch.compile, chunked cross-entropy, and for full fine-tuning paged 8-bit AdamW stepped in the backward "
        "pass; ours: none of these (the whole float32 logits)")
    return {"rows": rows, "device": device}


def main(argv: list[str] | None = None) -> None:
    args, rep = cli(__doc__, __file__, argv, {"models": "tiny", "dtypes": "float32"}, models="tiny,smollm2-135m",
                    methods="full,lora,last_layer", dtypes="float32", checkpointing="off,on", jobs=1, no_blocks=False)
    methods, dtypes = args.methods.split(","), args.dtypes.split(",")
    ckpts = [{"off": False, "on": True}[c] for c in args.checkpointing.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        train, eval_ = write_data(Path(tmp))
        todo = [(m, meth, d, c, SHAPES.get(m, (4, 128))[0]) for m in args.models.split(",") for d in dtypes
                for meth in methods for c in ckpts]
        if args.quick:
            todo += [("tiny", meth, "float32", False, TRAINING_PEAK_BATCH) for meth in ("full", "lora")]
        todo = [(m, meth, TrainConfig(model=m, method=meth, dtype=d, gradient_checkpointing=c, device="cpu", train_data=train,
                                      eval_data=eval_, seq_len=SHAPES.get(m, (4, 128))[1], batch_size=b, max_steps=3,
                                      report_every=b, eval_every=None, learning_rate=1e-4, threads=2, save_model=False))
                for m, meth, d, c, b in todo]
        with ThreadPoolExecutor(1) as pool:  # the block rows' process beside the whole runs'
            blocks = None if args.no_blocks else pool.submit(child, __file__, "block_rows", methods, dtypes, ckpts)
            rows = measure(todo, max(args.jobs, 2) if args.quick else args.jobs)
            block_rows = blocks.result()["rows"] if blocks else []
    if failed := [r for r in rows if r["status"] != "completed"]:
        raise RuntimeError(f"runs did not complete: {failed}")
    rep.table(HEADER, _rows(rows), "Whole runs (3 AdamW steps, final eval with memorization and forgetting, weight change); "
                                   "ratio = estimate / measured:")
    if block_rows:
        rep.table(HEADER, _rows(block_rows), "One forward and backward pass above the weights, against the estimate's "
                                             "backward phases:")
    worst = max(rows + block_rows, key=lambda r: abs(r["ratio"] - 1))
    rep(f"worst ratio {worst['ratio']:.2f} ({worst['model']} {worst['method']} {worst['dtype']}); all within 25%: "
        f"{all(0.75 <= r['ratio'] <= 1.25 for r in rows + block_rows)}")
    rep.save({"rows": rows, "block_rows": block_rows})


if __name__ == "__main__":
    entry(main, globals())
