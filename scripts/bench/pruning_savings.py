"""Pruning savings: optimizer steps saved by the sweep's stop rules, the best configuration kept, divergence caught fast.

    python scripts/bench/pruning_savings.py                       # lr.yaml with and without pruning (~2 x 10 min)
    python scripts/bench/pruning_savings.py --quick               # smoke.yaml, tiny model, 3 trials a run (~2 min)
    python scripts/bench/pruning_savings.py --pruned-dir sweeps_out/lr-instability    # reuse a finished lr.yaml sweep
    python scripts/bench/pruning_savings.py --pruned-dir A --unpruned-dir B --json pruning.json    # only compare

The same grid spec runs twice, same seeds: once as written (the divergence
stopper plus the spec's Optuna rule) and once "without pruning": overrides
``pruning.rule=none pruning.divergence.factor=1.0e9 pruning.divergence.spike=1.0e9
train.stop_factor=null`` turn off every stop rule the sweep and the trainer
have, except the trainer's own stop on a non-finite loss or grad norm, which
cannot be turned off (nothing is left to train after a NaN). Each sweep gets
its own ``name=`` and ``output_dir=`` and its own MLflow SQLite store in that
folder (``MLFLOW_TRACKING_URI=sqlite:///OUT/NAME.mlflow.db``), so the user's
store is left alone.

Read from each sweep's ``trials.json``, trials matched by their grid cell
(the spec's space keys, plus method, learning_rate, batch_size, epochs):

1. optimizer steps: a trial's steps are its last report's ``step``; the
   saving is 1 - (steps with pruning / steps without), target >= 30%;
2. the best configuration: the best objective (the spec's metric and mode)
   among trials neither pruned, diverged nor failed, in each run;
3. detection latency: for each trial the pruned run stopped as diverged, the
   reports between the first report past the divergence threshold and the
   stop, target <= 1. "Past the threshold" replays the unpruned run's history
   of the same cell through ``sweeps.pruning.DivergenceMonitor`` with the
   pruned spec's settings (the stopper's own class); the stop is the pruned
   run's last report. Reports are numbered from 1.

A grid prunes by the divergence rules only unless it runs one trial at a
time (``sweeps.spec``: a median rule compares a trial with whichever trials
had finished, so side by side Ray's timing would decide), so on ``lr.yaml``
the saving is the divergence stopper's; ``--quick`` adds a median rule with
``search.max_concurrent=1``. A benchmark, not a test: nothing is asserted
about the figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a file: import this checkout's packages

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SPEC = "search_spaces/lr.yaml"
QUICK_SPEC = "search_spaces/smoke.yaml"
# Every stop rule off: no Optuna rule, divergence thresholds nothing reaches, no trainer-side smoothed-loss stop.
UNPRUNED = ["pruning.rule=none", "pruning.divergence.factor=1.0e9", "pruning.divergence.spike=1.0e9",
            "train.stop_factor=null"]
# smoke.yaml has no Optuna rule and no diverging rate: add a rate that diverges (3.0 blows up full fine-tuning
# of the tiny model) to both runs, and a median rule that may act after one finished trial to the pruned run.
# Full fine-tuning only and one trial at a time: 3 trials a run, in the grid's (seeded) order, so the median
# rule sees the same finished trials every time; the two sweeps side by side then use the 2 cores.
# YAML needs the dot in 1.0e-3: a bare 1e-3 parses as a string.
QUICK_BOTH = ["space.method=[full]", "space.learning_rate=[1.0e-3, 3.0e-2, 3.0]", "search.max_concurrent=1",
              "train.memorization=false", "train.forgetting=false"]
QUICK_PRUNED = ["pruning.rule=median", "pruning.startup_trials=1", "pruning.warmup_reports=1"]
KEY_FIELDS = ("method", "learning_rate", "batch_size", "epochs")  # always part of a trial's grid cell
NOT_KEPT = ("pruned", "diverged", "failed")  # outcomes that cannot be the best configuration
TARGET_SAVED, TARGET_LATENCY = 0.30, 1

HEADER_STEPS = "| | with pruning | without pruning | saved |"
HEADER_BEST = "| run | method | learning_rate | batch_size | objective | outcome |"
HEADER_LATENCY = ("| method | lr | bs | past threshold at report # (examples) | stopped at report # (examples) "
                  "| stopped as | latency (reports) | after min_reports grace | rule past threshold (unpruned run) |")
HEADER_TRIALS = "| method | lr | bs | steps with pruning | steps without | outcome with pruning | outcome without |"


# --- running the two sweeps ------------------------------------------------------------------

def _spec_for_missing_run(args, out: Path) -> str:
    """The spec file the run(s) still to do use: the given pruned sweep's own spec, so the grid is the same."""
    if not args.pruned_dir:
        mine = Path(args.spec).resolve()  # the sweep runs from the repository root: a path from here must still work
        return str(mine) if mine.is_file() else args.spec
    import yaml

    saved = json.loads((Path(args.pruned_dir) / "spec.json").read_text())["spec"]
    saved.pop("source", None)
    path = out / "pruned-spec.yaml"
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    return str(path)


def _overrides(args, name: str, out: Path, pruned: bool) -> list[str]:
    common = [f"name={name}", f"output_dir={out}", f"tracking.experiment={name}",
              "tracking.uri=null"]  # a URI in the spec would bypass MLFLOW_TRACKING_URI
    extra = (QUICK_BOTH + (QUICK_PRUNED if pruned else [])) if args.quick and not args.pruned_dir else []
    return [*extra, *args.set, *common, *([] if pruned else UNPRUNED)]


def _run_sweep(spec: str, overrides: list[str], out: Path, name: str) -> tuple[Path, float]:
    """``python sweeps/run.py SPEC OVERRIDES`` in a fresh process; its console goes to <out>/<name>.log."""
    # One store per sweep: two sweeps creating one new SQLite store at once race on MLflow's schema migration
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / name}.mlflow.db"}
    log = out / f"{name}.log"
    t0 = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / "run.py"), spec, *overrides],
                              cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    sweep_dir = out / name
    if proc.returncode != 0 or not (sweep_dir / "trials.json").is_file():
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"sweep {name} failed (exit {proc.returncode}); the end of {log}:\n{tail}")
    return sweep_dir, wall


def _sweeps(args, out: Path) -> dict[str, dict]:
    """Both sweep folders, running the ones not given; --quick runs the two side by side (a smoke run)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    given = {"pruned": args.pruned_dir, "unpruned": args.unpruned_dir}
    todo = [kind for kind, folder in given.items() if not folder]
    if todo:
        out.mkdir(parents=True, exist_ok=True)
    spec = _spec_for_missing_run(args, out) if todo else None

    def one(kind: str) -> dict:
        name = f"pruning-savings-{stamp}-{kind}"
        overrides = _overrides(args, name, out, kind == "pruned")
        sweep_dir, wall = _run_sweep(spec, overrides, out, name)
        return {"dir": sweep_dir, "wall_s": wall, "spec": spec, "overrides": overrides}

    # A real measurement runs one sweep after the other: side by side they would share the cores, and the
    # median rule's decisions depend on which trials finish first.
    with ThreadPoolExecutor(2 if args.quick else 1) as pool:
        ran = dict(zip(todo, pool.map(one, todo)))
    return {kind: ran.get(kind) or {"dir": Path(folder), "wall_s": None, "spec": None, "overrides": None}
            for kind, folder in given.items()}


# --- reading a finished sweep ------------------------------------------------------------------

def _load(sweep_dir: Path) -> tuple[dict, list]:
    from sweeps.records import load_records

    path = sweep_dir / "trials.json"
    if not path.is_file():
        raise RuntimeError(f"{sweep_dir}: no trials.json; is it a finished sweep folder?")
    return json.loads((sweep_dir / "spec.json").read_text())["spec"], load_records(path)


def _key_fields(spec: dict) -> list[str]:
    return list(KEY_FIELDS) + sorted(k for k in spec["space"] if k not in KEY_FIELDS)


def _key(record, fields: list[str]) -> tuple:
    # %.6g: the same grid point must match even if one run stored 0.001 and the other 1e-3
    return tuple(f"{v:.6g}" if isinstance(v, float) else str(v) for v in (record.config.get(f) for f in fields))


def _in_order(key: tuple) -> tuple:
    """Sort cells by value, not by text (1e-05 before 0.0001)."""
    out = []
    for part in key:
        try:
            out.append((0, float(part), ""))
        except ValueError:
            out.append((1, 0.0, part))
    return tuple(out)


def _steps(record) -> int:
    return int(record.history[-1].get("step") or 0) if record.history else 0


def _diverged_stop(record) -> bool:
    """Stopped as diverged: by the sweep's divergence rules, or by the trainer itself (non-finite loss)."""
    return (record.stopped_by or "").startswith("diverged") or record.final.get("status") == "diverged"


def _spec_differences(a: dict, b: dict) -> list[str]:
    """Top-level spec blocks that differ between the runs, beyond what the unpruned run changes on purpose."""
    skip = {"name", "output_dir", "tracking", "source", "pruning"}
    diffs = [k for k in sorted(set(a) | set(b)) if k not in skip and k != "train" and a.get(k) != b.get(k)]
    ta, tb = ({k: v for k, v in s.get("train", {}).items() if k != "stop_factor"} for s in (a, b))
    return diffs + (["train"] if ta != tb else [])


# --- the three measures ------------------------------------------------------------------------

def _best(records, mode: str):
    kept = [r for r in records if r.outcome not in NOT_KEPT and r.objective is not None]
    if not kept:
        return None
    return (min if mode == "min" else max)(kept, key=lambda r: r.objective)


def _replay(record, divergence: dict) -> tuple[int | None, str | None]:
    """The first report (from 1) past the stopper's thresholds on this history, and the rule's words.

    min_reports=1: the threshold itself, not the spec's grace (a trial is not stopped before its
    min_reports-th report, so that its curve has that many points); the table shows both.
    """
    from sweeps.pruning import DivergenceMonitor

    monitor = DivergenceMonitor(divergence["factor"], divergence["spike"], 1)
    for i, report in enumerate(record.history, 1):
        result = dict(report)
        for name in ("train_loss", "train_loss_ema", "grad_norm"):
            if name in result and result[name] is None:  # trials.json stores a non-finite value as null
                result[name] = math.nan
        if i == len(record.history):  # only the last report carries the trainer's status (diverged on NaN)
            result.update(status=record.final.get("status"), reason=record.final.get("reason"))
        reason = monitor.update(result)
        if reason is not None:
            return i, reason
    return None, None


def _latency_rows(pruned: dict, unpruned: dict, divergence: dict, fields: list[str]) -> list[dict]:
    """A row per trial stopped as diverged, and per trial past the threshold that the pruned run did not stop so."""
    rows = []
    for key in sorted(set(pruned) & set(unpruned), key=_in_order):
        p, u = pruned[key], unpruned[key]
        first, rule = _replay(u, divergence)
        caught = _diverged_stop(p)
        if not caught and first is None:
            continue
        stop = len(p.history)
        rows.append({
            **{f: p.config.get(f) for f in fields}, "trial_pruned": p.trial_id, "trial_unpruned": u.trial_id,
            "first_report": first, "first_examples": u.history[first - 1].get("examples_seen") if first else None,
            "stop_report": stop, "stop_examples": p.history[-1].get("examples_seen") if p.history else None,
            "stopped_as": _stopped_as(p), "latency": stop - first if caught and first else None,
            # past the grace of min_reports: what the rule itself took
            "latency_after_grace": stop - max(first, divergence["min_reports"]) if caught and first else None,
            "rule": rule, "stopped_by": p.stopped_by,
        })
    return rows


def _stopped_as(record) -> str:
    if _diverged_stop(record):
        return "diverged"
    return "pruned" if (record.stopped_by or "").startswith("pruned") else "not stopped"


def _trial_rows(pruned: dict, unpruned: dict, fields: list[str]) -> list[dict]:
    rows = []
    for key in sorted(set(pruned) | set(unpruned), key=_in_order):
        p, u = pruned.get(key), unpruned.get(key)
        some = p or u
        rows.append({**{f: some.config.get(f) for f in fields},
                     "steps_pruned": _steps(p) if p else None, "steps_unpruned": _steps(u) if u else None,
                     "outcome_pruned": p.outcome if p else "missing", "outcome_unpruned": u.outcome if u else "missing",
                     "stopped_by_pruned": p.stopped_by if p else None})
    return rows


def measure(pruned_dir: Path, unpruned_dir: Path) -> dict:
    """Every figure of the benchmark from two finished sweep folders."""
    spec_p, recs_p = _load(pruned_dir)
    spec_u, recs_u = _load(unpruned_dir)
    fields = _key_fields(spec_p)
    pruned = {_key(r, fields): r for r in recs_p}
    unpruned = {_key(r, fields): r for r in recs_u}
    both = set(pruned) & set(unpruned)
    steps_p = sum(_steps(pruned[k]) for k in both)
    steps_u = sum(_steps(unpruned[k]) for k in both)
    best = {kind: _best(recs, spec_p["search"]["mode"]) for kind, recs in (("pruned", recs_p), ("unpruned", recs_u))}
    same = None
    if best["pruned"] and best["unpruned"]:
        same = _key(best["pruned"], fields) == _key(best["unpruned"], fields)
    latency = _latency_rows(pruned, unpruned, spec_p["pruning"]["divergence"], fields)
    known = [r["latency"] for r in latency if r["latency"] is not None]
    missed = sum(r["stopped_as"] == "not stopped" for r in latency)
    return {
        "fields": fields, "matched": len(both), "only_pruned": len(set(pruned) - both),
        "only_unpruned": len(set(unpruned) - both), "spec_differences": _spec_differences(spec_p, spec_u),
        "same_cell_twice": len(recs_p) - len(pruned) + len(recs_u) - len(unpruned),
        "metric": spec_p["search"]["metric"], "mode": spec_p["search"]["mode"],
        "steps_pruned": steps_p, "steps_unpruned": steps_u,
        "saved": 1 - steps_p / steps_u if steps_u else None,
        "stops": {kind: _stop_counts(recs) for kind, recs in (("pruned", recs_p), ("unpruned", recs_u))},
        "best": {kind: _best_row(r, fields) for kind, r in best.items()}, "same_best": same,
        "latency": latency, "max_latency": max(known) if known else None, "missed_divergences": missed,
        "trials": _trial_rows(pruned, unpruned, fields),
        "divergence": spec_p["pruning"]["divergence"], "rule": spec_p["pruning"]["rule"],
    }


def _stop_counts(records) -> dict:
    return {"trials": len(records),
            "pruned": sum((r.stopped_by or "").startswith("pruned") for r in records),
            "diverged": sum(_diverged_stop(r) for r in records),
            "failed": sum(r.outcome == "failed" for r in records)}


def _best_row(record, fields: list[str]) -> dict | None:
    if record is None:
        return None
    return {**{f: record.config.get(f) for f in fields}, "trial_id": record.trial_id, "objective": record.objective,
            "outcome": record.outcome}


# --- printing -----------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _steps_table(m: dict) -> list[str]:
    sp, su = m["stops"]["pruned"], m["stops"]["unpruned"]
    saved = f"{m['saved']:.0%} (target >= {TARGET_SAVED:.0%})" if m["saved"] is not None else "-"
    return [HEADER_STEPS, "|---|---|---|---|",
            f"| optimizer steps ({m['matched']} matched trials) | {m['steps_pruned']} | {m['steps_unpruned']} | {saved} |",
            f"| trials | {sp['trials']} | {su['trials']} | |",
            f"| stopped by the rule ({m['rule']}) | {sp['pruned']} | {su['pruned']} | |",
            f"| stopped as diverged | {sp['diverged']} | {su['diverged']} | |",
            f"| failed | {sp['failed']} | {su['failed']} | |"]


def _best_table(m: dict) -> list[str]:
    lines = [HEADER_BEST.replace("objective", f"objective ({m['metric']}, {m['mode']})"), "|---|---|---|---|---|---|"]
    for kind, label in (("pruned", "with pruning"), ("unpruned", "without pruning")):
        b = m["best"][kind]
        if b is None:
            lines.append(f"| {label} | - | - | - | - | no trial kept |")
            continue
        lines.append(f"| {label} | {b['method']} | {_fmt(b['learning_rate'])} | {_fmt(b['batch_size'])} | "
                     f"{b['objective']:.4f} | {b['outcome']} |")
    return lines


def _latency_table(m: dict) -> list[str]:
    lines = [HEADER_LATENCY, "|---|---|---|---|---|---|---|---|---|"]
    for r in m["latency"]:
        first = f"{r['first_report']} ({r['first_examples']})" if r["first_report"] else "never (unpruned run)"
        lines.append(f"| {r['method']} | {_fmt(r['learning_rate'])} | {_fmt(r['batch_size'])} | {first} | "
                     f"{r['stop_report']} ({_fmt(r['stop_examples'])}) | {r['stopped_as']} | {_fmt(r['latency'])} | "
                     f"{_fmt(r['latency_after_grace'])} | {r['rule'] or '-'} |")
    if not m["latency"]:
        lines.append("| (no trial stopped as diverged or past the threshold) | | | | | | | | |")
    return lines


def _trials_table(m: dict) -> list[str]:
    lines = [HEADER_TRIALS, "|---|---|---|---|---|---|---|"]
    for r in m["trials"]:
        lines.append(f"| {r['method']} | {_fmt(r['learning_rate'])} | {_fmt(r['batch_size'])} | {_fmt(r['steps_pruned'])} | "
                     f"{_fmt(r['steps_unpruned'])} | {r['outcome_pruned']} | {r['outcome_unpruned']} |")
    return lines


def _cpu_model() -> str:
    from scripts.bench._common import cpu_model

    return cpu_model()


def _versions() -> str:
    from importlib.metadata import version

    libs = ("ray", "optuna", "mlflow", "torch", "transformers")
    return ", ".join(f"{lib} {version(lib)}" for lib in libs) + f", Python {platform.python_version()}"


def _report(args, argv: list[str], runs: dict, m: dict) -> None:
    print(f"command: python scripts/bench/pruning_savings.py {shlex.join(argv)}".rstrip())
    print(f"{_versions()}; CPU {_cpu_model()}, {os.cpu_count()} cores")
    for kind, run in runs.items():
        how = (f"ran in {run['wall_s']:.0f} s: python sweeps/run.py {run['spec']} {shlex.join(run['overrides'])}"
               if run["wall_s"] is not None else f"given as --{kind}-dir")
        print(f"{kind}: {run['dir']} ({how})")
    if args.quick:
        where = "" if args.output_dir else " in a temp folder (deleted)"
        print(f"--quick: smoke.yaml on the tiny model, the two sweeps side by side{where}; a smoke run, not a measurement")
    if m["spec_differences"]:
        print(f"WARNING: the two sweeps' specs differ in {', '.join(m['spec_differences'])}: not the same grid")
    if m["same_cell_twice"]:
        print(f"WARNING: {m['same_cell_twice']} trial(s) repeat another's cell and were left out: is the spec a grid?")
    if m["only_pruned"] or m["only_unpruned"]:
        print(f"WARNING: unmatched trials: {m['only_pruned']} only with pruning, {m['only_unpruned']} only without")
    d = m["divergence"]
    print(f"\nOptimizer steps (each trial's last report's step), rule {m['rule']!r}, divergence factor {d['factor']:g} "
          f"spike {d['spike']:g} min_reports {d['min_reports']}. Without pruning the trainer still stops on a "
          f"non-finite loss or grad norm.\n")
    print("\n".join(_steps_table(m)))
    same = {True: "yes", False: "NO", None: "cannot tell (no kept trial in a run)"}[m["same_best"]]
    print(f"\nBest configuration (best objective among trials not {'/'.join(NOT_KEPT)}); the same: {same}\n")
    print("\n".join(_best_table(m)))
    worst = _fmt(m["max_latency"])
    print(f"\nDivergence detection latency per trial stopped as diverged (reports from 1; threshold replayed on the "
          f"unpruned run's history with sweeps.pruning.DivergenceMonitor); worst {worst} (target <= {TARGET_LATENCY}); "
          f"past the threshold but never stopped: {m['missed_divergences']}\n")
    print("\n".join(_latency_table(m)))
    print("\nAll trials\n")
    print("\n".join(_trials_table(m)))


# --- command line --------------------------------------------------------------------------------

def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=DEFAULT_SPEC, help="grid sweep spec to run twice")
    p.add_argument("--output-dir", help="where the sweeps go (default sweeps_out/bench; --quick: a temp folder)")
    p.add_argument("--pruned-dir", help="a finished sweep folder to use as the run with pruning (not run again)")
    p.add_argument("--unpruned-dir", help="a finished sweep folder to use as the run without pruning")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a spec override for both runs (repeatable), e.g. --set train.epochs=1")
    p.add_argument("--quick", action="store_true", help="smoke.yaml plus a diverging rate and a median rule (a smoke run)")
    p.add_argument("--json", metavar="OUT", help="also write every figure here")
    args = p.parse_args(argv)
    if args.quick:
        args.spec = QUICK_SPEC
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        out = Path(args.output_dir or (tmp if args.quick else ROOT / "sweeps_out" / "bench")).resolve()
        runs = _sweeps(args, out)
        m = measure(runs["pruned"]["dir"], runs["unpruned"]["dir"])
    _report(args, argv, runs, m)
    if args.json:
        figures = {"argv": argv, "runs": {k: {**r, "dir": str(r["dir"])} for k, r in runs.items()}, **m}
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
