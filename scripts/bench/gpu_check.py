"""GPU check: packing trials through Ray Tune (part A) and real model sizes (part B), one prepared script.

    python scripts/bench/gpu_check.py --out gpu_check.md --budget-s 480   # a CUDA machine: B, then A as time allows
    python scripts/bench/gpu_check.py --part b --out gpu_check.md         # part B alone: needs no Ray, Optuna or MLflow
    python scripts/bench/gpu_check.py --part a --repeats 3
    python scripts/bench/gpu_check.py --quick                             # the CPU, tiny model: keeps it from rotting

Part A, packing through Ray Tune. ``search_spaces/lr.yaml`` (SmolLM2-135M) runs through the product itself,
``python sweeps/run.py SPEC OVERRIDES`` as a subprocess in a session of its own (``sweep_overhead.run_sweep``),
MLflow in a temp SQLite store (``MLFLOW_TRACKING_URI``), each sweep under its own ``name=`` in a temp
``output_dir=``. Two rows, the same overrides on both: ``packed`` (``resources=auto``: each trial's GPU share
sized from ``trainer.memory.estimate``, so Ray packs as many as fit, see ``sweeps/placement.py``) and ``one per
GPU`` (``resources={gpu: 1}``). The default overrides cut the sweep to a few minutes a row and make both rows run
the same trials: ``search.refine=null`` (refinement trials depend on the grid's results), ``pruning.rule=none``
(the median rule prunes by the order trials finish, which packing changes; the divergence rules stay on, and
stop the same trials in both rows) and ``space.batch_size=[8]`` (12 trials: 3 methods x 4 learning rates);
``--override KEY=VALUE`` adds more. First a warm-up sweep whose figures are discarded (the GGUF conversion into
the model cache, the base model's cached evaluation, first imports and their bytecode), then ``--repeats``
rounds, each running the two rows in an order shuffled with ``--seed``. Per row: wall (the sweep command,
launch to exit: Ray's start and the report included, as a user waits for it), mean GPU busy % (NVML, else
``nvidia-smi``, sampled every 0.5 s over that wall), trials per hour counting only the trials whose
``trials.json`` ``final.status`` is ``completed``, the most trials that ran at once (their
``start_unix``/``end_unix``), the GPU share each asked for and its peak memory against its estimate
(``peak_mem_gib``, ``mem_estimate_gib``); mean and min-max over the repeats, and the packed / one-per-GPU
ratio of completed trials per hour (of the means, and its range over the repeats' pairs). ``--budget-s``
starts no repeat that the last one's duration says would not end in time.

Part B, real sizes, through ``trainer.loop.train`` directly (no Ray). Random-init models built from the
published configs, in bf16: Llama-3.2-1B's dimensions (hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV
heads, vocab 128256, tied embeddings) and Llama-3.1-8B's (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8
KV heads, vocab 128256, untied); RoPE scaling is left at the default (it changes neither memory nor speed). Each
is built once with ``AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)`` (on the GPU, for a fast
init) and saved with the project's tokenizer (SmolLM2's, ``load_tokenizer(ensure_preset("smollm2-135m"))``) into
a temp folder, and trained from there. **The vocabulary stays 128256**, so the embedding, the head and the logits
have their real sizes; the tokenizer only produces the first 49152 ids. Data: a synthetic JSONL written to the
temp folder, prompt/completion records of random words from the tokenizer's vocabulary, each about ``--seq-len``
tokens (so a batch is ``--batch-size`` x ``--seq-len`` tokens, as torchtune's packed batches are). Rows per
model: LoRA (r 8, all linear layers), QLoRA (LoRA on a 4-bit NF4 base), full fine-tuning (torch AdamW, whose
states take the weights' dtype), and for the 8B also full with ``optimizer: adamw_8bit``; all with
``gradient_checkpointing``, ``--steps`` optimizer steps (6), constant LR, no forgetting/memorization/weight-change
extras, nothing saved. Each row is a fresh process (in this one under ``--quick``). Per row: the estimate (``trainer.memory.estimate(cfg,
device="cuda")``: its ``total_gib``; ``device="cpu"`` under ``--quick``; n/a where that function is not on this branch), the measured peak (the
run's ``peak_mem_gib``: ``torch.cuda.max_memory_allocated``), tokens/s and s/step after step 1 (from the
trainer's per-step reports: ``tokens_per_s`` over each step's ``train_time_s``), and torchtune's published
figure for Llama-3.1-8B on one GPU beside the 8B rows ("torchtune README memory table", pytorch/torchtune,
section "Memory and training speed": batch 2, a dataset packed to sequence length 2048, torch.compile on; on one
RTX 4090: LoRA 16.2 GiB and 3083 tokens/s, QLoRA 7.4 GiB and 2413, full 18.9 GiB and 1650, the full one with its
single-device recipe's memory savers: paged 8-bit AdamW with the optimizer step fused into the backward pass,
``recipes/configs/llama3_1/8B_full_single_device.yaml``). A row whose estimate exceeds the GPU's memory (its
total, nvidia-smi's) is not
run and says so (``--try-all`` runs it anyway; an out-of-memory run ends ``failed``).

``--quick`` (the CPU, CI; two tiny Ray sweeps and three 2-step runs, about 30 s of CPU time): part A runs ``search_spaces/smoke.yaml`` cut to a 2-cell
grid (LoRA x 2 learning rates, 8 examples, 2 steps) once, no warm-up; without a GPU the second row is "one at a
time" (``search.max_concurrent=1``) and GPU busy is n/a. Part B builds a model from the ``tiny`` preset's config
(its vocabulary, 49152) through the same build, save and train path: LoRA, QLoRA and full, 2 steps of 2 x 128
tokens. Its figures are a smoke run, not a measurement.

The device machine (CUDA torch, transformers, peft and accelerate, no Ray, Optuna or MLflow, no package
registry, 64 MiB a call): ``scripts/bench/gpu_check.sh`` lists the exact calls (download the wheels here, carry
them over in parts, install them into /tmp/site there, run this script with ``--out $OUT/gpu_check.md``).

What goes to BENCHMARKS.md section 7, with the machine and versions lines this script prints: part A's table
(both rows' wall, completed trials/hour, GPU busy %, trials at once, share, peak/estimate, with their spread)
and the ratio line, replacing the bare-process packing figures measured before it; part B's table as a new
"real sizes" table (estimate against measured peak per row, tokens/s, torchtune's figures beside the 8B rows),
with the skipped rows and why; the ratio also goes to row 7 of the summary table at the top. Nothing from a
``--quick`` run goes there.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a file: import this checkout's packages

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3
_ROW_MARK = "GPU_CHECK_RESULT "  # the line a child process answers with

HEADER_A = ("| row | resources | runs | wall s | trials completed / run | completed trials/hour | mean GPU busy % | "
            "most trials at once | GPU share a trial | largest peak GiB | its estimate GiB |")
HEADER_A_RUNS = "| repeat | order | row | wall s | trials | completed | completed trials/hour | mean GPU busy % |"
HEADER_B = ("| model | method | optimizer | status | estimate GiB | measured peak GiB | peak / estimate | "
            "tokens/s after step 1 | s/step after step 1 | setup s | torchtune, Llama-3.1-8B, 1 GPU |")

# Published dimensions (the models' config.json on the hub): only the sizes, no weights are read.
LLAMA = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
# (label, TrainConfig settings). The 8B also gets full with 8-bit AdamW states: torch AdamW's states take the
# weights' dtype (bf16: 30 GiB at 8B), fp32 ones would not fit 80 GB, and either may not with the rest
B_ROWS = [("lora", {"method": "lora"}), ("qlora", {"method": "lora", "quantization": "4bit"}), ("full", {"method": "full"})]
B_ROW_8BIT = ("full", {"method": "full", "optimizer": "adamw_8bit"})
TORCHTUNE = {"lora": "16.2 GiB, 3083 tok/s", "qlora": "7.4 GiB, 2413 tok/s", "full": "18.9 GiB, 1650 tok/s"}
TORCHTUNE_NOTE = ("torchtune: \"torchtune README memory table\" (pytorch/torchtune, \"Memory and training speed\"), "
                  "Llama-3.1-8B on 1x RTX 4090, batch 2, packed to 2048 tokens, torch.compile on; its full fine-tune "
                  "uses the single-device recipe's paged 8-bit AdamW with the optimizer step in the backward pass")


class Report:
    """The markdown the script prints, also written to ``--out`` after each part (a killed run keeps what it had)."""

    def __init__(self, out: str | None):
        self.out, self.lines = (Path(out) if out else None), []

    def __call__(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
        self.lines.extend(lines)
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text("\n".join(self.lines) + "\n")


# --- the machine ----------------------------------------------------------------------------------------------------

def gpus() -> list[dict[str, Any]]:
    """Each GPU's name, memory (GiB) and driver, from nvidia-smi ([] without one)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.strip().splitlines():
        name, mib, driver = (part.strip() for part in line.split(","))
        rows.append({"name": name, "memory_gib": float(mib) / 1024, "driver": driver})
    return rows


def _version(*names: str) -> str:
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return "not installed"


def machine_lines(argv: list[str], found: list[dict]) -> list[str]:
    from scripts.bench._common import cpu_model

    gpu = ", ".join(f"{g['name']} ({g['memory_gib']:.1f} GiB, driver {g['driver']})" for g in found) or "none"
    versions = {name: _version(*alts) for name, alts in (
        ("torch", ("torch",)), ("transformers", ("transformers",)), ("peft", ("peft",)), ("accelerate", ("accelerate",)),
        ("bitsandbytes", ("bitsandbytes",)), ("ray", ("ray",)), ("optuna", ("optuna",)),
        ("mlflow", ("mlflow", "mlflow-skinny")))}
    return [f"command: python scripts/bench/gpu_check.py {shlex.join(argv)}".rstrip(),
            f"machine: {platform.platform()}, CPU {cpu_model()}, {os.cpu_count()} cores; GPU: {gpu}; "
            f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}",
            "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]


class GpuSampler:
    """Mean GPU busy % (over all GPUs) every ``every`` s while in the ``with`` block; None without a GPU."""

    def __init__(self, enabled: bool, every: float = 0.5):
        self.enabled, self.every, self.samples = enabled, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None

    def _run(self) -> None:
        read, close = _nvml_reader()
        try:
            while not self._stop.is_set():
                with contextlib.suppress(Exception):  # a missed sample is not worth stopping the sweep for
                    values = read()
                    if values:
                        self.samples.append(statistics.mean(values))
                self._stop.wait(self.every)
        finally:
            close()


def _nvml_reader():
    """``(read, close)``: NVML (Ray's bundled copy, else nvidia-ml-py), else one nvidia-smi call a sample."""
    nvml = None
    for name in ("ray._private.thirdparty.pynvml", "pynvml"):
        with contextlib.suppress(Exception):
            nvml = importlib.import_module(name)
            nvml.nvmlInit()
            break
        nvml = None
    if nvml is not None:
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        return (lambda: [float(nvml.nvmlDeviceGetUtilizationRates(h).gpu) for h in handles]), nvml.nvmlShutdown

    def smi() -> list[float]:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout
        return [float(v) for v in out.split()]

    return smi, lambda: None


# --- small formatting helpers ---------------------------------------------------------------------------------------

def spread(values: list[float | None], digits: int = 0) -> str:
    """``mean (min-max)`` over the repeats; one value alone; n/a when none was measured."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = f"{statistics.mean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


class Budget:
    def __init__(self, seconds: float | None):
        self.end = time.monotonic() + seconds if seconds else None

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()


# --- part A: packing through Ray Tune -------------------------------------------------------------------------------

A_OVERRIDES = ["search.refine=null", "pruning.rule=none", "space.batch_size=[8]", "tracking.experiment=gpu-check"]
A_QUICK_OVERRIDES = ["space.method=[lora]", "data.train=builtin:facts:8", "train.epochs=1", "train.memorization=false",
                     "train.forgetting=false", "train.eval_every=8", "failure.checkpoint_every=0",
                     "tracking.experiment=gpu-check"]


def a_rows(has_gpu: bool) -> list[tuple[str, str, list[str]]]:
    """``(row, what it asks Ray for, overrides)``: packed, and one trial per GPU (one at a time without a GPU)."""
    packed = ("packed", "resources: auto", ["resources=auto"])
    if has_gpu:
        return [packed, ("one per GPU", "resources: {gpu: 1}", ["resources={gpu: 1}"])]
    return [packed, ("one at a time", "resources: auto, search.max_concurrent=1 (no GPU)",
                     ["resources=auto", "search.max_concurrent=1"])]


def a_missing() -> list[str]:
    return [name for name in ("ray", "optuna", "mlflow") if importlib.util.find_spec(name) is None]


def estimate_available() -> bool:
    import trainer.memory

    return hasattr(trainer.memory, "estimate")


def run_a_sweep(spec: str, overrides: list[str], tmp: Path, tag: str, has_gpu: bool, budget: Budget) -> dict[str, Any]:
    """One sweep command: its wall, GPU busy % and what its trials.json says."""
    from scripts.bench.sweep_overhead import run_sweep

    name = f"gpucheck-{tag}"
    out = tmp / "sweeps"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    argv = [f"name={name}", f"output_dir={out}", *overrides]
    with GpuSampler(has_gpu) as sampler:
        try:
            timing = run_sweep(spec, argv, env, timeout=max(budget.left(), 1.0))
        except RuntimeError as exc:
            return {"error": f"the sweep failed: {_last_line(str(exc))}"}
    wall = timing["exit_unix"] - timing["launch_unix"]
    trials_json = out / name / "trials.json"
    if timing["stopped_early"] or not trials_json.is_file():
        return {"error": f"stopped by --budget-s after {wall:.0f} s" if timing["stopped_early"] else "no trials.json"}
    finals = [r.get("final") or {} for r in json.loads(trials_json.read_text())]
    completed = sum(f.get("status") == "completed" for f in finals)
    shares = sorted({f["gpu_share"] for f in finals if f.get("gpu_share")})
    peaks = [(f["peak_mem_gib"], f.get("mem_estimate_gib")) for f in finals if f.get("peak_mem_gib") is not None]
    peak, est = max(peaks, key=lambda p: p[0]) if peaks else (None, None)
    return {"wall_s": wall, "trials": len(finals), "completed": completed, "per_hour": completed * 3600 / wall,
            "gpu_busy": sampler.mean, "at_once": most_at_once(finals), "shares": shares, "peak_gib": peak,
            "estimate_gib": est}


def most_at_once(finals: list[dict]) -> int | None:
    """The most trials whose trainer ran at the same time (``start_unix`` .. ``end_unix``; trials that ended)."""
    events = sorted(ev for f in finals if f.get("start_unix") and f.get("end_unix")
                    for ev in ((f["start_unix"], 1), (f["end_unix"], -1)))
    if not events:
        return None
    most = now = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
        now += step
        most = max(most, now)
    return most


def run_line(r: dict[str, Any]) -> str:
    """One sweep's row of the per-run table."""
    if "error" in r:
        return f"| {r['repeat']} | {r['order']} | {r['row']} | {r['error']} | | | | |"
    return (f"| {r['repeat']} | {r['order']} | {r['row']} | {r['wall_s']:.1f} | {r['trials']} | {r['completed']} | "
            f"{r['per_hour']:.0f} | {_num(r['gpu_busy'], 0)} |")


def part_a(args, emit: Report, found: list[dict], budget: Budget) -> dict[str, Any]:
    has_gpu = bool(found)
    spec = str((ROOT / args.spec).resolve()) if not Path(args.spec).is_absolute() else args.spec
    base = (A_QUICK_OVERRIDES if args.quick else A_OVERRIDES) + list(args.override)
    rows = a_rows(has_gpu)
    emit("", f"## Part A: packing through Ray Tune ({Path(args.spec).name})", "")
    missing = a_missing()
    if missing:
        emit(f"not run: {', '.join(missing)} not importable here (part A runs the real sweep; see gpu_check.sh)")
        return {"skipped": f"missing {missing}"}
    if has_gpu and not estimate_available():
        emit("not run: resources: auto sizes GPU shares with trainer.memory.estimate, which is not on this branch")
        return {"skipped": "no trainer.memory.estimate"}
    emit(f"overrides on both rows: `{' '.join(base)}`",
         "rows: " + "; ".join(f"{r} = `{' '.join(ov)}`" for r, _, ov in rows))
    with tempfile.TemporaryDirectory(prefix="gpu-check-a-") as tmp_name:
        tmp = Path(tmp_name)
        import mlflow  # noqa: F401 - configures its loggers on import; then they are told to keep quiet
        from scripts.bench.sweep_overhead import _warm_store

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its "Creating initial MLflow database tables"
        _warm_store(f"sqlite:///{tmp / 'mlflow.db'}")  # the store's tables exist, as a user's store has them
        if args.warmup:
            warm = run_a_sweep(spec, [*base, *rows[0][2], "space.method=[lora]"], tmp, "warmup", has_gpu, budget)
            emit("warm-up (packed, LoRA trials only; discarded): "
                 + (warm.get("error") or f"{warm['wall_s']:.1f} s, {warm['completed']}/{warm['trials']} completed"))
        emit("", HEADER_A_RUNS, "|" + "---|" * HEADER_A_RUNS.count(" | ") + "---|")
        rng = random.Random(args.seed)
        runs: list[dict[str, Any]] = []
        last_round = 0.0
        for rep in range(1, args.repeats + 1):
            if last_round and budget.left() < last_round * 1.1:
                emit(f"repeats stopped after {rep - 1} of {args.repeats}: the next would not end within --budget-s")
                break
            order = rows[:]
            rng.shuffle(order)
            t0 = time.monotonic()
            for row, _, ov in order:
                if budget.left() < 10:
                    result = {"error": "not run: --budget-s spent"}
                else:
                    result = run_a_sweep(spec, [*base, *ov], tmp, f"{row.replace(' ', '-')}-{rep}", has_gpu, budget)
                runs.append({"repeat": rep, "order": " then ".join(r for r, _, _ in order), "row": row, **result})
                emit(run_line(runs[-1]))
            last_round = time.monotonic() - t0
    emit("", HEADER_A, "|" + "---|" * HEADER_A.count(" | ") + "---|")
    means = {}
    for row, asks, _ in rows:
        done = [r for r in runs if r["row"] == row and "error" not in r]
        if not done:
            errors = "; ".join(r["error"] for r in runs if r["row"] == row) or "not run"
            emit(f"| {row} | {asks} | 0 | {errors} |" + " |" * (HEADER_A.count(" | ") - 3))
            continue
        means[row] = statistics.mean(r["per_hour"] for r in done)
        share = ", ".join(f"{s:g}" for s in sorted({s for r in done for s in r["shares"]})) or "-"
        at_once = sorted({r["at_once"] for r in done if r["at_once"] is not None})
        emit(f"| {row} | {asks} | {len(done)} | {spread([r['wall_s'] for r in done], 1)} | "
             f"{'/'.join(sorted({str(r['completed']) for r in done}))} of {'/'.join(sorted({str(r['trials']) for r in done}))} | "
             f"{spread([r['per_hour'] for r in done])} | {spread([r['gpu_busy'] for r in done])} | "
             f"{'-'.join(str(n) for n in (at_once[0], at_once[-1])) if len(at_once) > 1 else (at_once or ['n/a'])[0]} | "
             f"{share} | {spread([r['peak_gib'] for r in done], 2)} | {spread([r['estimate_gib'] for r in done], 2)} |")
    (first, _, _), (second, _, _) = rows
    if first in means and second in means and means[second] > 0:
        pairs = [(a["per_hour"], b["per_hour"]) for a in runs for b in runs if a["repeat"] == b["repeat"]
                 and a["row"] == first and b["row"] == second and "error" not in a and "error" not in b and b["per_hour"]]
        ratios = [a / b for a, b in pairs]
        emit("", f"{first} / {second}, completed trials per hour: **{means[first] / means[second]:.2f}x** "
                 f"(per repeat {min(ratios):.2f}x-{max(ratios):.2f}x)")
    if not has_gpu:
        emit("", "no GPU: GPU busy is n/a and the second row runs one trial at a time on the CPUs")
    return {"rows": [r for r, _, _ in rows], "runs": runs, "overrides": base}


# --- part B: real sizes ---------------------------------------------------------------------------------------------

def _words(tokenizer) -> list[str]:
    """Whole words of the tokenizer's vocabulary (a leading-space token of letters only), sorted for a seeded draw."""
    vocab = tokenizer.get_vocab()
    return sorted(t[1:] for t in vocab if t.startswith("\u0120") and t[1:].isalpha() and t[1:].isascii() and len(t) > 3)


def write_data(folder: Path, tokenizer, seq_len: int, n: int, seed: int = 0) -> tuple[str, str, int]:
    """A training JSONL of ``n`` prompt/completion records of random words, each about ``seq_len`` tokens with EOS,
    and a 2-record eval JSONL of short ones; returns their paths and the tokens of the first training record."""
    rng = random.Random(seed)
    words = _words(tokenizer)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def record(prompt_words: int, target: int) -> dict[str, str]:
        prompt = " ".join(rng.choices(words, k=prompt_words)) + "\n"
        budget = target - count(prompt) - 2  # EOS, and a BOS where the tokenizer adds one
        completion = rng.choices(words, k=max(1, budget))
        for _ in range(20):
            over = count(" ".join(completion)) - budget
            if -8 <= over <= 0:
                break
            completion = completion[:len(completion) - over] if over > 0 else completion + rng.choices(words, k=-over)
        return {"prompt": prompt, "completion": " ".join(completion)}

    train = [record(min(64, seq_len // 8), seq_len) for _ in range(n)]
    evals = [record(8, 24) for _ in range(2)]
    paths = []
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    first = count(train[0]["prompt"]) + count(train[0]["completion"]) + 1
    return paths[0], paths[1], first


def _build_child(payload: dict) -> dict:
    """Build a random-init bf16 model from a config and save it with the project's tokenizer (a child process)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from trainer.models import ensure_preset, load_tokenizer

    tokenizer = load_tokenizer(ensure_preset("smollm2-135m"))
    if payload.get("preset"):
        config = AutoConfig.from_pretrained(ensure_preset(payload["preset"]), local_files_only=True)
    else:
        config = LlamaConfig(**payload["dims"], max_position_embeddings=131072, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    where = "cuda" if payload["device"] == "cuda" and torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    with torch.device(where):  # random init of 8B parameters: seconds on a GPU, minutes on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(payload["dir"])
    tokenizer.save_pretrained(payload["dir"])
    return {"params": sum(p.numel() for p in model.parameters()), "vocab": config.vocab_size,
            "tokenizer_ids": len(tokenizer), "seconds": time.perf_counter() - t0}


def _row_child(payload: dict) -> dict:
    """One training run (a child process): status, peak memory, tokens/s and s/step after step 1."""
    from trainer.config import TrainConfig
    from trainer.loop import train
    from trainer.quiet import quiet_libraries

    quiet_libraries()
    cfg = TrainConfig(**payload["cfg"])
    reports: list[dict] = []

    def report(metrics: dict, checkpoint=None) -> None:
        reports.append({k: metrics.get(k) for k in ("step", "tokens_per_s", "train_time_s", "peak_mem_gib")})

    result = train(cfg, report)
    steps = [r for r in reports if r["step"] is not None]
    tokens = seconds = 0.0
    for before, now in zip(steps, steps[1:]):  # each report covers the steps since the one before: here one step
        dt = now["train_time_s"] - before["train_time_s"]
        tokens, seconds = tokens + now["tokens_per_s"] * dt, seconds + dt
    after = steps[-1]["step"] - steps[0]["step"] if steps else 0
    peaks = [r["peak_mem_gib"] for r in reports if r["peak_mem_gib"] is not None]
    return {"status": result.status, "reason": result.reason, "steps": result.metrics.get("step"),
            "peak_gib": max(peaks, default=None), "setup_s": result.metrics.get("setup_time_s"),
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "s_per_step": seconds / after if after > 0 and seconds > 0 else None}


def _child(flag: str, payload: dict, timeout: float, in_process: bool = False) -> dict:
    """Run this script with ``flag`` in a fresh process (isolated peak memory; an OOM or a crash ends only that
    process); its answer, or what went wrong. ``in_process``: call it here (--quick: saves a process start a row)."""
    if in_process:
        return (_row_child if flag == "--row" else _build_child)(payload)
    cmd = [sys.executable, str(Path(__file__).resolve()), flag, json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=None if timeout == float("inf") else max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        return {"status": "not finished", "reason": f"stopped by --budget-s after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_ROW_MARK):
            return json.loads(line[len(_ROW_MARK):])
    return {"status": "crashed", "reason": f"exit {proc.returncode}: {_last_line(proc.stderr) or _last_line(proc.stdout)}"}


def estimate_of(cfg, device: str) -> tuple[float | None, str]:
    """``trainer.memory.estimate(cfg, device)``: its GiB and ``describe()``; None and why where there is none."""
    if not estimate_available():
        return None, "trainer.memory.estimate is not on this branch"
    from trainer.memory import estimate

    try:
        est = estimate(cfg, device=device)
    except Exception as exc:  # an estimate that cannot be made must not stop the measurement
        return None, f"estimate failed: {type(exc).__name__}: {exc}"
    return est.total_gib, est.describe()


def b_plan(args) -> list[tuple[str, dict, list[tuple[str, dict]]]]:
    """``(model, how to build it, rows)`` for each model."""
    if args.quick:
        return [("tiny", {"preset": "tiny"}, B_ROWS)]
    plan = []
    for name in args.models.split(","):
        if name not in LLAMA:
            raise SystemExit(f"--models: unknown {name!r}; choose from {', '.join(LLAMA)}")
        plan.append((name, {"dims": LLAMA[name]}, B_ROWS + ([B_ROW_8BIT] if name == "llama-3.1-8b" else [])))
    return plan


def b_line(r: dict[str, Any]) -> str:
    """One training run's row of part B's table."""
    est, peak = r.get("estimate_gib"), r.get("peak_gib")
    ratio = f"{peak / est:.2f}" if est and peak else "n/a"
    tt = TORCHTUNE.get(r["label"], "-") if r["model"] == "llama-3.1-8b" else "-"
    return (f"| {r['model']} | {r['label']} | {r['settings'].get('optimizer', 'adamw')} | {r['status']} | {_num(est, 2)} | "
            f"{_num(peak, 2)} | {ratio} | {_num(r.get('tokens_per_s'), 0)} | {_num(r.get('s_per_step'), 3)} | "
            f"{_num(r.get('setup_s'), 1)} | {tt} |")


def part_b(args, emit: Report, found: list[dict], budget: Budget) -> dict[str, Any]:
    from trainer.config import TrainConfig
    from trainer.models import ensure_preset, load_tokenizer
    from trainer.quiet import quiet_libraries

    quiet_libraries()  # --quick trains in this process: no weight-writing bars
    # bitsandbytes' 4-bit matmul on the CPU backward (--quick's QLoRA row): torch's advisory, not this run's problem
    warnings.filterwarnings("ignore", message=".*an autograd kernel was not registered.*")
    device = "cuda" if found and not args.quick else "cpu"
    gpu_gib = found[0]["memory_gib"] if device == "cuda" else None
    emit("", f"## Part B: real sizes through trainer.loop.train (bf16 weights, gradient checkpointing, "
             f"batch {args.batch_size} x seq_len {args.seq_len}, {args.steps} steps, {device})", "")
    rows_out: list[dict[str, Any]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-b-", dir=args.work_dir) as tmp_name:
        tmp = Path(tmp_name)
        tokenizer = load_tokenizer(ensure_preset("smollm2-135m"))
        train_path, eval_path, tokens = write_data(tmp, tokenizer, args.seq_len, args.steps * args.batch_size + 2)
        emit(f"data: {args.steps * args.batch_size + 2} records of random words, {tokens} tokens each with EOS "
             f"(seq_len {args.seq_len}); the tokenizer (SmolLM2's) produces ids below {len(tokenizer)}")
        emit("", HEADER_B, "|" + "---|" * HEADER_B.count(" | ") + "---|")
        base = dict(dtype="bfloat16", gradient_checkpointing=True, device=device, batch_size=args.batch_size,
                    seq_len=args.seq_len, max_steps=args.steps, learning_rate=1e-5, warmup_ratio=0.0,
                    scheduler="constant", report_every=args.batch_size, eval_every=None, memorization=False,
                    forgetting=False, weight_change=False, train_data=train_path, eval_data=eval_path,
                    save_model=False, seed=0)
        for model, build, rows in b_plan(args):
            folder = tmp / model
            built = _child("--build", {**build, "dir": str(folder), "device": device}, budget.left(), args.quick)
            if "params" not in built:
                notes.append(f"{model}: not built: {built.get('reason')}")
                for label, settings in rows:
                    rows_out.append({"model": model, "label": label, "settings": settings, "status": "not built"})
                    emit(b_line(rows_out[-1]))
                continue
            notes.append(f"{model}: {built['params'] / 1e9:.2f} B parameters, vocab {built['vocab']}, "
                         f"built and saved in {built['seconds']:.0f} s")
            for label, settings in rows:
                cfg = TrainConfig(model=str(folder), **base, **settings)
                est, why = estimate_of(cfg, device)
                row = {"model": model, "label": label, "settings": settings, "estimate_gib": est, "estimate": why}
                if gpu_gib and est is not None and est > gpu_gib and not args.try_all:
                    row.update(status=f"skipped: estimate {est:.1f} GiB > the GPU's {gpu_gib:.1f} GiB")
                elif budget.left() < 30:
                    row.update(status="not run: --budget-s spent")
                else:
                    row.update(_child("--row", {"cfg": cfg.model_dump(mode="json")}, budget.left(), args.quick))
                rows_out.append(row)
                emit(b_line(row))
                gc.collect()
            shutil.rmtree(folder, ignore_errors=True)  # 16 GB for the 8B: one model on disk at a time
    emit("", *[f"model {n}" for n in notes])
    failed = [r for r in rows_out if r.get("reason")]
    if failed:
        emit("", *[f"{r['model']} {r['label']}: {r['reason']}" for r in failed])
    if any(r.get("estimate") and r.get("estimate_gib") is None for r in rows_out):
        emit("", f"estimate n/a: {next(r['estimate'] for r in rows_out if r.get('estimate') and r.get('estimate_gib') is None)}")
    described = [f"estimate {r['model']} {r['label']} ({r['settings'].get('optimizer', 'adamw')}): {r['estimate']}"
                 for r in rows_out if r.get("estimate_gib") is not None]
    if described:
        emit("", *described)
    emit("", f"{TORCHTUNE_NOTE}. Ours: no torch.compile, and the whole logits in float32 (no chunked cross-entropy).")
    if args.quick:
        emit("--quick: the tiny model on the CPU (peak = the process's peak resident set); a smoke run, not a measurement")
    return {"rows": rows_out, "device": device, "gpu_memory_gib": gpu_gib}


# --- main -----------------------------------------------------------------------------------------------------------

def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("a", "b", "both"), default="both", help="part B runs first with both")
    p.add_argument("--quick", action="store_true", help="the CPU, tiny model: a smoke run of both parts (CI)")
    p.add_argument("--out", metavar="FILE", help="also write the report (markdown) here, rewritten as it grows")
    p.add_argument("--json", metavar="FILE", help="also write every figure here")
    p.add_argument("--budget-s", type=float, help="seconds for the whole script: no repeat, row or child starts that "
                                                   "would not end in time (default: no limit)")
    p.add_argument("--spec", default="search_spaces/lr.yaml", help="part A's sweep spec")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="part A: one more override for both rows (repeatable)")
    p.add_argument("--repeats", type=int, default=3, help="part A: rounds of the two rows")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="part A: no warm-up sweep")
    p.add_argument("--seed", type=int, default=0, help="part A: the seed of the rows' shuffled order")
    p.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b", help="part B: " + ", ".join(LLAMA))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6, help="part B: optimizer steps a row")
    p.add_argument("--try-all", action="store_true", help="part B: run rows whose estimate exceeds the GPU's memory")
    p.add_argument("--work-dir", help="part B: where the models are saved (default: the temp folder; 16 GB for the 8B)")
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--build", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.spec, args.repeats, args.warmup = "search_spaces/smoke.yaml", 1, False
        args.batch_size, args.seq_len, args.steps = 2, 128, 2
    if args.repeats < 1 or args.steps < 2:
        p.error("--repeats must be >= 1 and --steps >= 2 (tokens/s is taken after step 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.row or args.build:
        answer = _row_child(json.loads(args.row)) if args.row else _build_child(json.loads(args.build))
        print(_ROW_MARK + json.dumps(answer), flush=True)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the models are built here
    budget = Budget(args.budget_s)
    emit = Report(args.out)
    found = gpus()
    emit(*machine_lines(argv, found))
    if args.quick:
        emit("--quick: a smoke run on the tiny model; the numbers below are not a measurement")
    results: dict[str, Any] = {"argv": argv, "gpus": found}
    if args.part in ("b", "both"):
        results["b"] = part_b(args, emit, found, budget)
    if args.part in ("a", "both"):
        results["a"] = part_a(args, emit, found, budget)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
