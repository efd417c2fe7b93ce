"""Sweep overhead (BENCHMARKS.md sections 1 and 5): where a sweep's wall x slots goes, against HF
``hyperparameter_search`` on the same trials; and start-up, launch to the first optimizer step."""
import json
import math
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: this checkout's packages

from scripts.bench._harness import ROOT, child, cli, entry, fmt, run_sweep
from sweeps.spec import SweepSpec, load_spec, trial_config  # here: the HF child imports it anyway

_PROGRESS = re.compile(r"^\[\d+:\d\d\] (\S+)\s+(\S+) ")  # sweeps.launch.progress: "[mm:ss] start   049a12d3 lora lr=..."
EFF = ["runner", "trials", "slots", "wall s", "training s", "eval s", "training share", "useful share (training + eval)"]
PARTS = {"training": "training (optimizer steps)", "eval": "eval (periodic and final)", "setup": "model load + setup",
         "per_trial_start": "per-trial start (Tune starts it -> trainer begins)",
         "in_trial_other": "in-trial other (reports, checkpoints)", "idle": "idle slots while Tune runs",
         "startup": "start-up before Tune x slots", "finish": "finish after fit() x slots"}
MILESTONES = {"ready": "Ray and MLflow up", "trial_started": "first trial started by Tune",
              "trainer_began": "first trainer began", "first_step": "first optimizer step done"}


def _events(lines: list) -> dict:
    """Arrival times of the sweep's own lines: Tune about to start, each trial's start/end, fit() returned."""
    spans, last = {}, None  # trial id -> its [start, end] times (a trial started again has more than one)
    for i, (t, text) in enumerate(lines):
        if m := _PROGRESS.match(text):
            last, (event, trial) = i, m.groups()
            if event == "start":
                spans.setdefault(trial, []).append([t, None])
            elif trial in spans and spans[trial][-1][1] is None:
                spans[trial][-1][1] = t
    return {"ready": next((t for t, text in lines if text.startswith("mlflow: ")), None), "spans": spans,
            "fit_end": lines[last + 1][0] if last is not None and last + 1 < len(lines) else None}


def _milestones(launch: float, ev: dict, marks: list[dict]) -> dict:
    """Seconds after launch: Tune about to start, the first trial started, its trainer began, its first optimizer step."""
    def after(*times) -> float | None:
        return min(t for t in times if t) - launch if any(times) else None
    return {"ready": after(ev["ready"]), "trial_started": after(*(s[0][0] for s in ev["spans"].values() if s)),
            "trainer_began": after(*(m.get("start_unix") for m in marks)),
            "first_step": after(*(m.get("first_step_unix") for m in marks))}


def analyse_sweep(sweep_dir: Path, timing: dict, slots: int) -> dict:
    """Training share, useful share and where wall x slots went, from trials.json and the console lines' times."""
    from sweeps.results.records import read_trials
    records = read_trials(sweep_dir / "trials.json")
    ev = _events(timing["lines"])
    if ev["ready"] is None or ev["fit_end"] is None:
        raise RuntimeError(f"{sweep_dir}: the sweep's console lines do not show Tune's start and end")
    final = [r.final for r in records]
    train, evals, setup = (sum(f.get(k) or 0.0 for f in final) for k in ("train_time_s", "eval_time_s", "setup_time_s"))
    span_sum = per_trial_start = 0.0
    for r in records:
        runs = [s for s in ev["spans"].get(r.trial_id.split("_")[-1], []) if s[1] is not None]
        span_sum += sum(end - start for start, end in runs)
        if runs and r.final.get("start_unix") is not None:
            per_trial_start += r.final["start_unix"] - runs[-1][0]
    wall = timing["exit_unix"] - timing["launch_unix"]
    total = wall * slots
    parts = {"training": train, "eval": evals, "setup": setup, "per_trial_start": per_trial_start,
             "in_trial_other": span_sum - per_trial_start - setup - train - evals,
             "idle": (ev["fit_end"] - ev["ready"]) * slots - span_sum,
             "startup": (ev["ready"] - timing["launch_unix"]) * slots, "finish": (timing["exit_unix"] - ev["fit_end"]) * slots}
    return {"trials": len(records), "slots": slots, "wall_s": wall, "total": total, "parts": parts, "train_s": train,
            "eval_s": evals, "startup": _milestones(timing["launch_unix"], ev, final),
            "outcomes": dict(sorted(Counter(r.outcome or "?" for r in records).items())),
            "training_share": train / total, "useful_share": (train + evals) / total}


def startup_rep(spec_file: str, rep: int, out: Path, uri: str, slots: int) -> dict:
    """The spec's first ``slots`` trials, stopped once each has done its first optimizer step."""
    from sweeps.results.collect import trial_results
    name, sweep_dir = f"bench-startup-{rep}", out / f"bench-startup-{rep}"

    def first_steps() -> dict:  # trial id -> its first report that has done an optimizer step
        found = trial_results(sweep_dir) if sweep_dir.is_dir() else {}
        return {t: s[0] for t, rows in found.items() if (s := [r for r in rows if r.get("first_step_unix")])}

    timing = run_sweep(spec_file, name, out, [f"search.n_trials={slots}", f"tracking.experiment={name}"], uri,
                       stop=lambda: len(first_steps()) >= slots, timeout=900)
    return _milestones(timing["launch_unix"], _events(timing["lines"]), list(first_steps().values()))


def hf_search(job: dict) -> dict:
    """(In a fresh process.) Optuna's GridSampler over the trial indexes, each trial to its end (NopPruner)."""
    import optuna
    import torch

    from scripts.bench import _hf
    torch.set_num_threads(job["threads"])
    spec = SweepSpec.model_validate(job["spec"])
    cfgs = [trial_config(spec.base, c) for c in job["configs"]]  # they vary no data setting (checked by the parent)
    indexes, times = list(range(len(cfgs))), _hf.StepTimes()
    begin = _hf.search(cfgs[0], lambda trial: cfgs[trial.suggest_categorical("trial", indexes)], len(cfgs), callbacks=[times],
                       pruner=optuna.pruners.NopPruner(), sampler=optuna.samplers.GridSampler({"trial": indexes}, seed=0))
    return {**vars(times), "trials": len(cfgs), "search_begin_unix": begin, "search_end_unix": time.time(),
            "threads": torch.get_num_threads()}


def run_hf(sweep_dir: Path, spec: dict, n: int, threads: int) -> dict | None:
    """The sweep's first ``n`` trials (in the order their trainers began) through HF (0: none); start-up reported apart."""
    from sweeps.results.records import read_trials
    if not n:
        return None
    records = sorted(read_trials(sweep_dir / "trials.json"), key=lambda r: (r.final.get("start_unix") or math.inf, r.trial_id))
    configs = [r.config for r in records[:n]]
    if varied := [k for k in ("max_examples", "seq_len", "model") if len({str(c.get(k)) for c in configs}) > 1]:
        raise ValueError(f"the HF side tokenizes one data set, but the trials vary {varied}")
    launch = time.time()
    res = child(__file__, "hf_search", {"spec": spec, "configs": configs, "threads": threads}, timeout=7200)
    search = res["search_end_unix"] - res["search_begin_unix"]
    return {**res, "slots": 1, "wall_s": search, "search_s": search, "startup_s": res["search_begin_unix"] - launch,
            "first_step_s": res["first_step_unix"] - launch, "training_share": res["train_s"] / search,
            "useful_share": (res["train_s"] + res["eval_s"]) / search}


def main(argv: list[str] | None = None) -> None:
    args, rep = cli(__doc__, __file__, argv, dict(spec="search_spaces/smoke.yaml", reps=1, hf_trials=4), hf_trials=6, reps=3,
                    spec="search_spaces/lr.yaml")  # HF: the sweep's first N trials (0: none); start-up reps
    with tempfile.TemporaryDirectory(prefix="bench-sweep-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        spec = load_spec(ROOT / args.spec)
        # --quick: in the temporary folder; else a real sweep beside the user's ones (kept: its console lines' times)
        out, name, store = (tmp / "sweeps", spec.name, uri) if args.quick else (
            ROOT / spec.output_dir, f"{spec.name}-bench-{time.strftime('%Y%m%d-%H%M%S')}", None)
        timing = run_sweep(args.spec, name, out, [], store)
        sweep_dir = out / name
        (sweep_dir / "bench_timing.json").write_text(json.dumps(timing))
        saved = json.loads((sweep_dir / "spec.json").read_text())["spec"]
        # trials Ray runs at once, as the sweep's own plan said it ("full: 1 CPU per trial; 2 trial(s) at once")
        slots = max([int(m[1]) for _, text in timing["lines"] if (m := re.search(r"(\d+) trial\(s\) at once", text))] or [1])
        sweep = analyse_sweep(sweep_dir, timing, slots)
        spec_file = tmp / "spec.yaml"  # the sweep's own spec, so the start-up reps run the same trials
        spec_file.write_text(json.dumps({k: v for k, v in saved.items() if k != "source"}))
        with ThreadPoolExecutor(1) as pool:  # HF before the start-up reps; --quick: beside them, to halve the wall
            hf = pool.submit(run_hf, sweep_dir, saved, args.hf_trials, min(timing["cpus"], slots))
            if not args.quick:
                hf.result()
            reps = [startup_rep(str(spec_file), i + 1, tmp / "startup", uri, slots) for i in range(args.reps)]
        hf = hf.result()
    rep(f"sweep: {sweep_dir} ({spec.source or 'spec.json'}; model {spec.model}; {sweep['trials']} trials: "
        + ", ".join(f"{n} {o}" for o, n in sweep["outcomes"].items()) + f"); {slots} slots on {timing['cpus']} CPUs", "")
    runners = {"this project's sweep (Ray Tune, trials in parallel)": sweep,
               "HF Trainer.hyperparameter_search (optuna, one process), the search only": hf}
    rep.table(EFF, [[label, r["trials"], r["slots"], fmt(r["wall_s"]), fmt(r["train_s"]), fmt(r["eval_s"]),
                     f"{r['training_share']:.2f}", f"**{r['useful_share']:.2f}**"] for label, r in runners.items() if r],
              "Share of wall x slots in the trials' optimizer steps (training) and in them plus evaluation (useful); the "
              "sweep's wall is the command's, launch to exit:")
    if hf:
        rep("HF process start-up, apart (launch to the search's start: imports, tokenizer, data, Trainer): "
            f"{hf['startup_s']:.1f} s; {hf['threads']} torch threads; launch to first optimizer step {hf['first_step_s']:.1f} s",
            "")
    rep.table(["sweep: part of wall x slots", "seconds", "%"],
              [[PARTS[k], fmt(v), fmt(100 * v / sweep["total"])] for k, v in sweep["parts"].items()]
              + [[f"total: wall {sweep['wall_s']:.1f} s x {slots} slots", fmt(sweep["total"]), "100.0"]],
              "Where the sweep's wall x slots went:")
    rep.table(["start-up: seconds after launch", "median of reps", "reps", "the measured sweep"],
              [[label, fmt(statistics.median(v)) if (v := [r[k] for r in reps if r[k] is not None]) else "n/a",
                ", ".join(fmt(x) for x in v) or "-", fmt(sweep["startup"][k])] for k, label in MILESTONES.items()],
              f"Start-up (warm model cache; {len(reps)} short run(s) of the spec's first {slots} trials):")
    rep.save({"sweep": sweep, "hf": hf, "startup_reps": reps})


if __name__ == "__main__":
    entry(main, globals())
