"""Sweep overhead: what share of a sweep's wall x slots is training, against HF ``hyperparameter_search``; start-up.

    python scripts/bench/sweep_overhead.py                     # lr.yaml (SmolLM2-135M, 24 trials, ~10 min), HF on its trials, 3 start-up reps
    python scripts/bench/sweep_overhead.py --hf-trials 6       # the same, HF on the first 6 trials only (HF runs every trial to its end)
    python scripts/bench/sweep_overhead.py --quick             # smoke.yaml (tiny model, 4 trials), HF on them, 1 start-up rep: < 2 min
    python scripts/bench/sweep_overhead.py --sweep-dir sweeps_out/lr-instability-bench-20250101-120000   # analyse a sweep run before
    python scripts/bench/sweep_overhead.py --sweep-dir sweeps_out/lr-instability --wall-s 612 --hf-trials 6 --reps 0
    python scripts/bench/sweep_overhead.py --quick --json sweep_overhead.json

1. Orchestration efficiency: the sum of the trials' training seconds (each
   trial's last ``train_time_s``: seconds inside optimizer steps only) over
   wall x slots, target >= 0.90. Wall is the sweep command's, launch to exit
   (timed from here); slots is the number of trials Ray can run at once:
   CPUs (``os.sched_getaffinity``) / the spec's CPUs per trial (the method
   that needs the fewest), capped by ``search.max_concurrent`` and the number
   of trials. The rest of wall x slots is broken down from the sweep folder
   (``trials.json``: ``setup_time_s``, ``eval_time_s`` and the trainer's wall
   clock marks ``start_unix`` and ``first_step_unix``) and from the times at
   which the sweep's console lines arrived here: its ``mlflow: ...`` line
   (Ray and MLflow are up, Tune is next), the progress lines that open and
   close each trial, and the first line after the last of those (``fit()``
   returned). ``--sweep-dir`` reads those lines back from the
   ``bench_timing.json`` this script writes into every sweep folder it runs;
   for a sweep run by hand give ``--wall-s`` (the ``wall time:`` it printed,
   Tune's ``fit()`` only) and only training, setup and eval are split out.
2. The same trials (model, data, method, learning rate, batch size, optimizer
   steps, schedule, eval cadence, seed) through Hugging Face
   ``Trainer.hyperparameter_search(backend="optuna")`` in one process: an
   Optuna ``GridSampler`` over the trial indexes, ``model_init`` applying the
   project's ``get_method(method).prepare``, torch given the same total CPU
   threads as the sweep's slots. Its efficiency is the sum of the trials'
   ``train_runtime`` (minus the evaluations HF runs inside it) over the
   process's wall, launch to exit, slots = 1. HF has no pruning: every trial
   runs to its last step.
3. Start-up: seconds from launching ``python sweeps/run.py`` to the first
   trial's first optimizer step (the earliest ``first_step_unix``), with the
   model cache warm. Each rep runs the first ``slots`` trials of the same
   spec into a temp folder (and a temp MLflow store, created beforehand like a
   user's existing one), stopped once each has reported its first step; the
   median over ``--reps`` is given, next to the measured sweep's own figure.

Without --quick or --sweep-dir the measured sweep is a real one, kept for
--sweep-dir and the other benchmarks: ``<spec name>-bench-<time>`` in the
spec's output_dir (or --output-dir), tracked where the spec says. --quick
puts everything in a temp folder and runs the HF search and the start-up
rep side by side, to save wall time. Each sweep command runs in a session
of its own; whatever it leaves (Ray's processes) is stopped, process by
process, by that session's id. A benchmark, not a test: nothing is
asserted about the figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a file: import this checkout's packages

ROOT = Path(__file__).resolve().parents[2]
TARGET = 0.90
TIMING_FILE = "bench_timing.json"  # written into each sweep folder this script runs
HEADER_EFF = "| runner | trials | slots | wall s | training s | efficiency | efficiency inside fit / search |"
HEADER_SWEEP = "| sweep: part of wall x slots | seconds | % |"
HEADER_HF = "| HF hyperparameter_search: part of wall | seconds | % |"
HEADER_START = "| start-up: seconds after launch | median of reps | reps | the measured sweep |"
_PROGRESS = re.compile(r"^\[\d+:\d\d\] (\S+)\s+(\S+) ")  # sweeps.progress: "[mm:ss] start   049a12d3 lora lr=..."


# --- running a sweep command and timing its console lines ---------------------------------------

def _read_lines(stream, lines: list) -> None:
    for line in stream:
        lines.append((time.time(), line.rstrip("\n")))


def _session_pids(sid: int) -> list[int]:
    """The processes of session ``sid`` (Linux /proc): the sweep's driver and everything Ray started under it."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # a zombie is already gone; its parent reaps it
            pids.append(int(stat.parent.name))
    return pids


def _stop_session(sid: int) -> None:
    """Stop what is left of a sweep command's session: TERM, then KILL, each of its processes by id.

    Ray's workers set their own process group, so a process-group kill alone can miss them; they stay in the
    session this script created for the command (start_new_session), which holds nothing else.
    """
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + grace
        pids = _session_pids(sid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = _session_pids(sid)
        if not pids:
            return


def run_sweep(spec: str, overrides: list[str], env: dict[str, str], *, stop=None, timeout: float = 3600) -> dict:
    """``python sweeps/run.py SPEC OVERRIDES`` in its own session; every stdout line with its arrival time.

    ``stop()`` (polled) ends the command early: its whole session gets SIGTERM, Ray's processes included.
    """
    cmd = [sys.executable, str(ROOT / "sweeps" / "run.py"), spec, *overrides]
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}  # lines must arrive when printed, not in blocks
    lines: list[tuple[float, str]] = []
    with tempfile.TemporaryFile("w+") as err:
        launch = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
        reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
        reader.start()
        stopped = _wait(proc, stop, timeout)
        exit_unix = time.time()
        _stop_session(proc.pid)  # the driver is gone; Ray's processes may linger a moment
        reader.join(timeout=10)
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0 and not stopped:
        tail = "\n".join(text for _, text in lines[-40:])
        raise RuntimeError(f"sweep failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail}\n{stderr[-4000:]}")
    return {"argv": cmd[1:], "launch_unix": launch, "exit_unix": exit_unix, "returncode": proc.returncode,
            "stopped_early": stopped, "cpus": _cpus(), "lines": lines}


def _wait(proc: subprocess.Popen, stop, timeout: float) -> bool:
    """Wait for the command; True if ``stop()`` (or the timeout) ended it."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline or (stop is not None and stop()):
            _stop_session(proc.pid)
            proc.wait(timeout=30)
            return True
        time.sleep(0.1 if stop is None else 0.25)
    return False


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --- reading a sweep back -----------------------------------------------------------------------

def _spec(sweep_dir: Path):
    from sweeps.spec import SweepSpec

    return SweepSpec.model_validate(json.loads((sweep_dir / "spec.json").read_text())["spec"])


def slots_for(spec, cpus: int, gpus: int = 0) -> tuple[int, str, int]:
    """Trials Ray can run at once, how that was worked out (in words), and the CPU threads they use together."""
    from sweeps.placement import Node, at_once, largest_trials, trial_resources
    from sweeps.space import n_trials

    nodes = [Node(cpus, gpus, spec.resources.gpu_memory_gib)]
    placer = trial_resources(spec, nodes)  # the product's own placement: resources: auto or fixed shares
    per_method = []
    for cfg in largest_trials(spec, placer).values():
        share = placer.share(cfg)
        per_method.append((at_once(share, nodes, None), share.cpu))
    fit, cpu = max(per_method)  # the cheapest method: the most trials at once, so the strictest denominator
    slots = min(fit, spec.search.max_concurrent or fit, n_trials(spec))
    how = f"{cpus} CPUs / {cpu:g} CPU per trial"
    if spec.search.max_concurrent:
        how += f", max_concurrent {spec.search.max_concurrent}"
    slots = max(slots, 1)
    return slots, how, max(1, min(cpus, slots * max(1, int(cpu))))  # a trial gets int(CPUs) torch threads


def _events(lines: list) -> dict:
    """Arrival times of the sweep's own lines: Tune about to start, each trial's start/end, fit() returned."""
    ready = next((t for t, text in lines if text.startswith("mlflow: ")), None)
    spans: dict[str, list[list[float]]] = {}
    last_progress = None
    for i, (t, text) in enumerate(lines):
        m = _PROGRESS.match(text)
        if not m:
            continue
        last_progress = i
        event, trial = m.groups()
        if event == "start":
            spans.setdefault(trial, []).append([t, None])
        elif trial in spans and spans[trial][-1][1] is None:
            spans[trial][-1][1] = t
    after = lines[last_progress + 1] if last_progress is not None and last_progress + 1 < len(lines) else None
    fit_end = after[0] if after else None
    printed = next((float(m.group(1)) for _, text in lines if (m := re.match(r"wall time:\s+([\d.]+) s", text))), None)
    return {"ready": ready, "fit_end": fit_end, "spans": spans, "printed_fit_wall_s": printed}


def analyse_sweep(sweep_dir: Path, timing: dict | None, wall_s: float | None, slots: int) -> dict:
    """Efficiency and where wall x slots went; ``timing`` from bench_timing.json, else ``wall_s`` (fit() only)."""
    from sweeps.records import load_records

    records = load_records(sweep_dir / "trials.json")
    train = sum(r.final.get("train_time_s") or 0.0 for r in records)
    evals = sum(r.final.get("eval_time_s") or 0.0 for r in records)
    # every report carries setup_time_s, so a trial stopped early has it too (older sweeps: missing)
    setups = [r.final.get("setup_time_s") for r in records]
    setup = sum(s for s in setups if s is not None)
    out: dict[str, Any] = {"sweep_dir": str(sweep_dir), "trials": len(records), "slots": slots,
                           "outcomes": _count(r.outcome or "?" for r in records),
                           "setup_missing": sum(s is None for s in setups)}
    parts = {"training": train, "setup": setup, "eval": evals}
    if timing is None:
        total = wall_s * slots
        parts["other"] = total - train - setup - evals
        out.update(wall_s=wall_s, wall_is="fit() as printed by the sweep (--wall-s)", fit_wall_s=wall_s)
    else:
        ev = _events(timing["lines"])
        if ev["ready"] is None or ev["fit_end"] is None:
            raise RuntimeError(f"{sweep_dir / TIMING_FILE}: the sweep's console lines do not show Tune start and end")
        wall = timing["exit_unix"] - timing["launch_unix"]
        total = wall * slots
        per_trial_start, span_sum, retried = _trial_spans(records, ev["spans"])
        window = ev["fit_end"] - ev["ready"]
        parts.update(
            per_trial_start=per_trial_start,
            in_trial_other=span_sum - per_trial_start - setup - train - evals,
            idle=window * slots - span_sum,
            startup=(ev["ready"] - timing["launch_unix"]) * slots,
            finish=(timing["exit_unix"] - ev["fit_end"]) * slots,
        )
        out.update(wall_s=wall, wall_is="the command, launch to exit", fit_wall_s=window,
                   printed_fit_wall_s=ev["printed_fit_wall_s"], retried=retried,
                   peak_concurrency=_peak(ev["spans"]), startup=_milestones(timing, ev, records))
    out.update(parts=parts, total=total, efficiency=train / total,
               efficiency_fit=train / (out["fit_wall_s"] * slots))
    return out


def _trial_spans(records, spans: dict) -> tuple[float, float, int]:
    """Sum of (trainer began - Tune started the trial), sum of trial spans, and trials started more than once."""
    per_trial_start = span_sum = 0.0
    retried = 0
    for r in records:
        runs = [s for s in spans.get(r.trial_id.split("_")[-1], []) if s[1] is not None]
        if not runs:
            continue
        retried += len(runs) > 1
        span_sum += sum(end - start for start, end in runs)
        if r.final.get("start_unix") is not None:  # the last attempt's trainer: the one the final report is from
            per_trial_start += r.final["start_unix"] - runs[-1][0]
    return per_trial_start, span_sum, retried


def _peak(spans: dict) -> int:
    edges = sorted((t, d) for runs in spans.values() for s, e in runs if e is not None for t, d in ((s, 1), (e, -1)))
    peak = now = 0
    for _, d in edges:
        now += d
        peak = max(peak, now)
    return peak


def _milestones(timing: dict, ev: dict, records) -> dict:
    """Seconds after launch: Tune about to start, first trial started, first trainer began, first optimizer step."""
    launch = timing["launch_unix"]
    starts = [runs[0][0] for runs in ev["spans"].values() if runs]
    trainer = [r.final["start_unix"] for r in records if r.final.get("start_unix") is not None]
    steps = [r.final["first_step_unix"] for r in records if r.final.get("first_step_unix") is not None]
    return _from_launch(launch, ev["ready"], starts, trainer, steps)


def _from_launch(launch: float, ready: float | None, starts: list, trainer: list, steps: list) -> dict:
    def after(values):
        return min(values) - launch if values else None

    return {"ready": ready - launch if ready else None, "trial_started": after(starts),
            "trainer_began": after(trainer), "first_step": after(steps)}


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


# --- start-up reps: the first `slots` trials of the same spec, stopped at their first step ----------

def _first_steps(sweep_dir: Path) -> dict[str, dict]:
    """Per trial (from Ray's result.json lines as they are written): start_unix and first_step_unix."""
    out = {}
    for path in sweep_dir.glob("*/result.json"):
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if row.get("first_step_unix") is not None:
                out[row["trial_id"]] = {"start_unix": row.get("start_unix"), "first_step_unix": row["first_step_unix"]}
                break
    return out


def startup_rep(spec_file: str, rep: int, out: Path, uri: str, slots: int) -> dict:
    name = f"bench-startup-{rep}"
    overrides = [f"name={name}", f"output_dir={out}", f"search.n_trials={slots}", "tracking.uri=null",
                 f"tracking.experiment={name}"]
    sweep_dir = out / name
    timing = run_sweep(spec_file, overrides, {"MLFLOW_TRACKING_URI": uri},
                       stop=lambda: len(_first_steps(sweep_dir)) >= slots, timeout=900)
    marks = _first_steps(sweep_dir)
    if not marks:
        raise RuntimeError(f"start-up rep {rep}: no trial reported a first step; console:\n"
                           + "\n".join(text for _, text in timing["lines"][-30:]))
    ev = _events(timing["lines"])
    starts = [runs[0][0] for runs in ev["spans"].values() if runs]
    trainer = [m["start_unix"] for m in marks.values() if m["start_unix"] is not None]
    return _from_launch(timing["launch_unix"], ev["ready"], starts, trainer, [m["first_step_unix"] for m in marks.values()])


def _warm_store(uri: str) -> None:
    """Create the MLflow store's tables now, as a user's existing store has them: not part of start-up."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def _spec_file(sweep_dir: Path, tmp: Path) -> str:
    """The sweep's own spec (spec.json), as a file sweeps/run.py reads, so the start-up reps run the same trials."""
    saved = json.loads((sweep_dir / "spec.json").read_text())["spec"]
    saved.pop("source", None)
    path = tmp / "spec.yaml"
    path.write_text(json.dumps(saved, indent=1))  # JSON is YAML
    return str(path)


# --- HF: the same trials through Trainer.hyperparameter_search, in one process ---------------------

def run_hf(configs: list[dict], threads: int, tmp: Path) -> dict:
    """One fresh process (``--hf-one``); wall is launch to exit, measured here."""
    job = tmp / "hf_trials.json"
    job.write_text(json.dumps({"configs": configs, "threads": threads}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-one", str(job)]
    launch = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=7200)
    exit_unix = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"HF hyperparameter_search failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**res, "launch_unix": launch, "exit_unix": exit_unix, "wall_s": exit_unix - launch}


def analyse_hf(res: dict) -> dict:
    trials = res["trials"]
    train = sum(t["train_runtime"] - t["eval_in_train_s"] for t in trials)
    evals = sum(t["eval_s"] for t in trials)
    model = res["model_init_s"]
    before = res["search_begin_unix"] - res["launch_unix"] - res["model_init_before_search_s"]
    parts = {"training": train, "model": model, "eval": evals, "before": before}
    parts["other"] = res["wall_s"] - sum(parts.values())
    search = res["search_end_unix"] - res["search_begin_unix"]
    return {"trials": len(trials), "slots": 1, "wall_s": res["wall_s"], "parts": parts, "total": res["wall_s"],
            "efficiency": train / res["wall_s"], "efficiency_fit": train / search, "search_s": search,
            "threads": res["threads"], "optim": res["optim"],
            "first_step_s": res["first_step_unix"] - res["launch_unix"] if res.get("first_step_unix") else None}


def _hf_args(cfg, n_train: int) -> dict:
    """TrainingArguments fields that follow the trial's TrainConfig: the same optimizer steps, schedule and cadence."""
    per_step = cfg.examples_per_step
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * n_train / per_step))
    fields = {"learning_rate": cfg.learning_rate, "per_device_train_batch_size": cfg.batch_size,
              "gradient_accumulation_steps": cfg.grad_accum, "max_steps": steps, "lr_scheduler_type": cfg.scheduler,
              "warmup_steps": round(cfg.warmup_ratio * steps),  # ours rounds; HF would ceil a ratio < 1
              "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm or 0.0, "seed": cfg.seed,
              "logging_steps": max(1, round(cfg.report_every / per_step))}
    if cfg.eval_every:
        fields["eval_steps"] = max(1, round(cfg.eval_every / per_step))
    return fields


_SHARED = ("model", "train_data", "eval_data", "eval_fraction", "max_examples", "seq_len")  # one tokenized data set


def _hf_search(configs: list[dict], threads: int, tmp: str) -> dict:
    """``Trainer.hyperparameter_search`` over exactly these trial configs; per-trial times and the search's marks."""
    import optuna
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from scripts.bench.trainer_throughput import _HFDataset, _PadCollator
    from trainer.config import TrainConfig
    from trainer.data import load_records, split_records, tokenize
    from trainer.methods import get_method
    from trainer.models import load_model, load_tokenizer, resolve_model_dir

    torch.set_num_threads(threads)
    cfgs = [TrainConfig.model_validate({k: v for k, v in c.items() if k in TrainConfig.model_fields}) for c in configs]
    base = cfgs[0]
    varied = [k for k in _SHARED if any(getattr(c, k) != getattr(base, k) for c in cfgs)]
    if varied:
        raise ValueError(f"the HF side tokenizes one data set for all trials, but the trials vary {', '.join(varied)}")
    tokenizer = load_tokenizer(resolve_model_dir(base.model))
    train_records, eval_records = split_records(load_records(base.train_data), base.eval_data, base.eval_fraction, base.seed)
    if base.max_examples:
        train_records = train_records[: base.max_examples]
    train_ds = _HFDataset(tokenize(train_records, tokenizer, base.seq_len))
    eval_ds = _HFDataset(tokenize(eval_records, tokenizer, base.seq_len))
    indexes = list(range(len(cfgs)))
    marks = {"model_init_s": 0.0, "model_init_before_search_s": 0.0, "first_step_unix": None, "threads": 0}
    trials: list[dict] = []

    def pick(trial) -> TrainConfig:  # the same categorical in model_init and hp_space: Optuna returns one value
        return cfgs[trial.suggest_categorical("trial", indexes)] if trial is not None else base

    def model_init(trial):
        t0 = time.perf_counter()
        cfg = pick(trial)
        model, _ = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
        model = get_method(cfg.method).prepare(model, cfg)
        marks["model_init_s"] += time.perf_counter() - t0
        if trial is None:  # Trainer.__init__'s own call, before the search
            marks["model_init_before_search_s"] += time.perf_counter() - t0
        return model

    class Times(TrainerCallback):
        """Per trial: train_runtime, the evals inside it (HF counts them in train_runtime) and after it."""

        def on_train_begin(self, *_a, **_k):
            trials.append({"train_runtime": None, "eval_in_train_s": 0.0, "eval_s": 0.0, "in_train": True})

        def on_train_end(self, *_a, **_k):
            trials[-1]["in_train"] = False

        def on_step_end(self, *_a, **_k):
            if marks["first_step_unix"] is None:
                marks["first_step_unix"], marks["threads"] = time.time(), torch.get_num_threads()

        def on_log(self, args, state, control, logs=None, **_k):
            if logs and "train_runtime" in logs:
                trials[-1]["train_runtime"] = logs["train_runtime"]

        def on_evaluate(self, args, state, control, metrics=None, **_k):
            seconds = (metrics or {}).get("eval_runtime", 0.0)
            trials[-1]["eval_s"] += seconds
            if trials[-1]["in_train"]:
                trials[-1]["eval_in_train_s"] += seconds

    targs = TrainingArguments(
        output_dir=str(Path(tmp) / "hf_out"), **_hf_args(base, len(train_ds)),
        eval_strategy="steps" if base.eval_every else "no", per_device_eval_batch_size=16,  # ours evaluates 16 a batch
        logging_strategy="steps", label_names=["labels"],  # a peft-wrapped model hides `labels` from HF's sniffing
        logging_nan_inf_filter=False,  # the default hides NaN losses; never compare against that
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, remove_unused_columns=False,
    )
    trainer = Trainer(model_init=model_init, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=_PadCollator(tokenizer.pad_token_id), callbacks=[Times()])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict on stdout, where our one JSON line goes
    n_train = len(train_ds)
    marks["search_begin_unix"] = time.time()
    trainer.hyperparameter_search(
        hp_space=lambda trial: _hf_args(pick(trial), n_train), compute_objective=lambda m: m["eval_loss"],
        n_trials=len(cfgs), direction="minimize", backend="optuna",
        sampler=optuna.samplers.GridSampler({"trial": indexes}, seed=0),  # each configuration exactly once
        # HF reports each eval to Optuna and obeys should_prune(); the study's default MedianPruner would stop
        # some trials before HF logs their train_runtime. Every trial runs to its end, as "the same trials" says.
        pruner=optuna.pruners.NopPruner(),
    )
    marks["search_end_unix"] = time.time()
    return {**marks, "trials": [{k: v for k, v in t.items() if k != "in_train"} for t in trials],
            "optim": str(getattr(targs.optim, "value", targs.optim))}


def _hf_one(job: str) -> int:
    """The HF search in this fresh process; prints one JSON line."""
    import optuna

    from trainer.quiet import quiet_libraries

    quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = json.loads(Path(job).read_text())
    with tempfile.TemporaryDirectory(prefix="bench-sweep-overhead-hf-") as tmp:
        res = _hf_search(spec["configs"], spec["threads"], tmp)
    if any(t["train_runtime"] is None for t in res["trials"]):
        raise RuntimeError("a trial logged no train_runtime")
    print(json.dumps(res))
    return 0


def _hf_configs(sweep_dir: Path, n: int | None) -> list[dict]:
    """The sweep's trials in the order their trainers began (trial ids are random), the first ``n``."""
    from sweeps.records import load_records

    records = sorted(load_records(sweep_dir / "trials.json"), key=lambda r: (r.final.get("start_unix") or math.inf, r.trial_id))
    return [r.config for r in records[: n or len(records)]]


# --- tables -------------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def _pct(value: float | None, total: float) -> str:
    return "n/a" if value is None else f"{100 * value / total:.1f}"


def table_efficiency(sweep: dict, hf: dict | None) -> list[str]:
    lines = [HEADER_EFF, "|---|---|---|---|---|---|---|"]
    rows = [("this project's sweep (Ray Tune, trials in parallel processes)", sweep)]
    if hf:
        rows.append(("HF Trainer.hyperparameter_search (optuna, one process)", hf))
    for name, r in rows:
        lines.append(f"| {name} | {r['trials']} | {r['slots']} | {r['wall_s']:.1f} | {r['parts']['training']:.1f} | "
                     f"{r['efficiency']:.2f} | {r['efficiency_fit']:.2f} |")
    return lines


_SWEEP_ROWS = (
    ("training", "training (optimizer steps, `train_time_s`)"),
    ("setup", "model load + setup (load, base eval l0, method prepare: `setup_time_s`)"),
    ("eval", "eval (periodic and final: `eval_time_s`)"),
    ("per_trial_start", "per-trial start (Tune starts the trial -> trainer begins)"),
    ("in_trial_other", "in-trial other (reports, checkpoints, weight change, stop)"),
    ("idle", "idle slots while Tune runs (Tune set-up, worker launch, scheduling, the last trials' tail)"),
    ("startup", "start-up before Tune x slots (imports, preflight, Ray init, MLflow parent run)"),
    ("finish", "finish after fit() x slots (classify, report, figures, MLflow flush, exit)"),
    ("other", "everything else (not split without bench_timing.json)"),
)


def table_sweep(sweep: dict) -> list[str]:
    lines = [HEADER_SWEEP, "|---|---|---|"]
    for key, label in _SWEEP_ROWS:
        if key in sweep["parts"]:
            value = sweep["parts"][key]
            lines.append(f"| {label} | {_fmt(value)} | {_pct(value, sweep['total'])} |")
    lines.append(f"| total: wall {sweep['wall_s']:.1f} s x {sweep['slots']} slots | {sweep['total']:.1f} | 100.0 |")
    return lines


_HF_ROWS = (
    ("training", "training (`train_runtime` minus the evals inside it)"),
    ("model", "model load + method prepare (`model_init`, Trainer's own call included)"),
    ("eval", "eval (`eval_runtime`)"),
    ("before", "process start-up before the search (imports, tokenizer, data)"),
    ("other", "other (per-trial optimizer/dataloader setup, Optuna, process exit)"),
)


def table_hf(hf: dict) -> list[str]:
    lines = [HEADER_HF, "|---|---|---|"]
    for key, label in _HF_ROWS:
        lines.append(f"| {label} | {hf['parts'][key]:.1f} | {_pct(hf['parts'][key], hf['total'])} |")
    lines.append(f"| total: process wall, launch to exit | {hf['total']:.1f} | 100.0 |")
    return lines


_START_ROWS = (
    ("ready", "Ray and MLflow up (the sweep's `mlflow:` line)"),
    ("trial_started", "first trial started by Tune"),
    ("trainer_began", "first trainer began (`start_unix`)"),
    ("first_step", "**first optimizer step done** (`first_step_unix`)"),
)


def table_startup(reps: list[dict], measured: dict | None) -> list[str]:
    lines = [HEADER_START, "|---|---|---|---|"]
    for key, label in _START_ROWS:
        values = [r[key] for r in reps if r.get(key) is not None]
        med = statistics.median(values) if values else None
        runs = ", ".join(f"{v:.1f}" for v in values) or "-"
        lines.append(f"| {label} | {_fmt(med)} | {runs} | {_fmt((measured or {}).get(key))} |")
    return lines


# --- main ---------------------------------------------------------------------------------------

def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default="search_spaces/lr.yaml", help="the sweep spec to run and measure")
    p.add_argument("--sweep-dir", help="analyse this finished sweep folder instead of running one")
    p.add_argument("--wall-s", type=float, help="with --sweep-dir and no bench_timing.json in it: the fit() wall "
                                                 "the sweep printed ('wall time: N s')")
    p.add_argument("--slots", type=int, help="concurrent trial slots (default: from the spec's resources and CPUs)")
    p.add_argument("--output-dir", help="where the measured sweep goes (default: the spec's output_dir)")
    p.add_argument("--hf-trials", type=int, help="run only the first N trials through HF (default: all); 0 = skip HF")
    p.add_argument("--reps", type=int, default=3, help="start-up reps (short runs of the same spec); 0 = none")
    p.add_argument("--quick", action="store_true", help="smoke.yaml into a temp folder, 1 start-up rep (a smoke run)")
    p.add_argument("--json", metavar="OUT", help="also write every figure here")
    p.add_argument("--hf-one", metavar="JOB", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.spec, args.reps = "search_spaces/smoke.yaml", 1
    spec = Path(args.spec)
    args.spec = str(spec.resolve() if spec.is_file() else (ROOT / spec).resolve())  # the sweep runs in ROOT
    if args.wall_s is not None and not args.sweep_dir:
        p.error("--wall-s goes with --sweep-dir")
    if args.reps < 0 or (args.hf_trials is not None and args.hf_trials < 0):
        p.error("--reps and --hf-trials must be >= 0")
    return args


def _measured_sweep(args, tmp: Path, uri: str | None) -> tuple[Path, dict]:
    """Run the spec (quick: into tmp, with a temp MLflow store) and keep its timing in the sweep folder."""
    from sweeps.spec import load_spec

    spec = load_spec(args.spec)  # resolved in _parse
    if args.quick:
        out, name, env = tmp / "sweeps", spec.name, {"MLFLOW_TRACKING_URI": uri}
        overrides = [f"output_dir={out}", "tracking.uri=null"]
    else:  # a real sweep of its own name beside the user's ones, kept for --sweep-dir and the other benchmarks
        out = (Path.cwd() / args.output_dir) if args.output_dir else (ROOT / spec.output_dir)  # run.py runs in ROOT
        out = out.resolve()
        name, env = f"{spec.name}-bench-{time.strftime('%Y%m%d-%H%M%S')}", {}
        overrides = [f"output_dir={out}"]
    timing = run_sweep(args.spec, [f"name={name}", *overrides], env)
    sweep_dir = out / name
    (sweep_dir / TIMING_FILE).write_text(json.dumps(timing))
    return sweep_dir, timing


def _hf_and_startup(args, sweep_dir: Path, tmp: Path, uri: str, slots: int, threads: int) -> tuple[dict | None, list]:
    """The HF comparison, then the start-up reps; --quick runs the two side by side (a smoke run, half the wall)."""
    def hf() -> dict | None:
        return analyse_hf(run_hf(_hf_configs(sweep_dir, args.hf_trials), threads, tmp)) if args.hf_trials != 0 else None

    def reps() -> list[dict]:
        if not args.reps:
            return []
        if not (tmp / "mlflow.db").is_file():  # quick: the measured sweep made it already
            _warm_store(uri)
        spec_file = _spec_file(sweep_dir, tmp)
        return [startup_rep(spec_file, i + 1, tmp / "startup", uri, slots) for i in range(args.reps)]

    if not args.quick:
        return hf(), reps()
    with ThreadPoolExecutor(2) as pool:
        hf_future, reps_future = pool.submit(hf), pool.submit(reps)
        return hf_future.result(), reps_future.result()


def _load_timing(args, sweep_dir: Path) -> dict | None:
    path = sweep_dir / TIMING_FILE
    if path.is_file():
        return json.loads(path.read_text())
    if args.wall_s is None:
        raise SystemExit(f"error: {sweep_dir} has no {TIMING_FILE} (it was not run by this script): "
                         "give --wall-s, the 'wall time: N s' the sweep printed")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.hf_one:
        return _hf_one(args.hf_one)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        if args.sweep_dir:
            sweep_dir = Path(args.sweep_dir).resolve()
            timing = _load_timing(args, sweep_dir)
        else:
            sweep_dir, timing = _measured_sweep(args, tmp, uri)
        spec = _spec(sweep_dir)
        cpus = (timing or {}).get("cpus") or _cpus()
        slots, how, threads = slots_for(spec, cpus)
        if args.slots:
            slots, how, threads = args.slots, "--slots", min(cpus, args.slots)
        sweep = analyse_sweep(sweep_dir, timing, args.wall_s if timing is None else None, slots)
        hf, reps = _hf_and_startup(args, sweep_dir, tmp, uri, slots, threads)
    _print(args, argv, spec, sweep, hf, reps, how)
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": argv, "machine": _machine(), "versions": _versions(),
                                               "slots_how": how, "sweep": sweep, "hf": hf, "startup_reps": reps},
                                              indent=1))
    return 0


def _versions() -> dict[str, str]:
    return {name: version(name) for name in ("torch", "ray", "optuna", "mlflow", "transformers")}


def _machine() -> dict:
    from scripts.bench._common import cpu_model as _cpu_model

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(), "cpus": _cpus()}


def _print(args, argv, spec, sweep, hf, reps, how) -> None:
    m = _machine()
    print(f"command: python scripts/bench/sweep_overhead.py {shlex.join(argv)}".rstrip())
    print(f"machine: {m['platform']}, CPU {m['cpu']}, {m['cpus']} cores; Python {m['python']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()))
    source = Path(spec.source or "spec.json")
    source = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
    print(f"sweep: {sweep['sweep_dir']} ({source}; model {spec.model}, {sweep['trials']} trials: "
          + ", ".join(f"{n} {o}" for o, n in sorted(sweep["outcomes"].items())) + ")")
    seen = f", peak concurrency seen {sweep['peak_concurrency']}" if "peak_concurrency" in sweep else ""
    print(f"slots: {sweep['slots']} ({how}){seen}; wall: {sweep['wall_is']}"
          + (f"; the sweep printed fit() wall {sweep['printed_fit_wall_s']:.0f} s" if sweep.get("printed_fit_wall_s") else ""))
    if hf:
        print(f"HF: {hf['trials']} of the sweep's {sweep['trials']} trials in one process, {hf['threads']} torch threads "
              f"(= the sweep's slots x 1 thread), optim {hf['optim']}, no pruning")
    if args.quick:
        print("--quick: a smoke run on a tiny model (HF and the start-up rep side by side); "
              "the numbers below are not a measurement")
    print(f"\nOrchestration efficiency = training s / (wall s x slots), target >= {TARGET:.2f}:\n")
    print("\n".join(table_efficiency(sweep, hf)))
    notes = []
    if sweep["setup_missing"]:
        notes.append(f"{sweep['setup_missing']} trial(s) without setup figures (counted in the remainder)")
    if sweep.get("retried"):
        notes.append(f"{sweep['retried']} trial(s) were retried: their earlier attempts count as in-trial other")
    print(f"\nWhere the sweep's wall x slots went{' (' + '; '.join(notes) + ')' if notes else ''}:\n")
    print("\n".join(table_sweep(sweep)))
    if hf:
        print("\nWhere HF's process wall went (slots = 1):\n")
        print("\n".join(table_hf(hf)))
    if reps or sweep.get("startup"):
        print(f"\nStart-up, warm model cache: seconds from launching `python sweeps/run.py` (median of {len(reps)} "
              f"short run(s) of the spec's first {sweep['slots']} trials, and the measured sweep):\n")
        print("\n".join(table_startup(reps, sweep.get("startup"))))
        if hf and hf["first_step_s"] is not None:
            print(f"\nFor reference, HF hyperparameter_search: launch to first optimizer step {hf['first_step_s']:.1f} s.")


if __name__ == "__main__":
    sys.exit(main())
