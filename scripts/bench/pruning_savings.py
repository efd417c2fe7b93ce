"""Pruning savings (BENCHMARKS.md section 2): lr.yaml's grid twice, with and without the stop rules, refinement off in both
so that the grid cells match one to one: optimizer steps saved, the best configuration kept, divergence caught fast."""
import json
import math
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: this checkout's packages

from scripts.bench._harness import cli, entry, fmt, run_sweep

BOTH = ["search.refine=null"]  # refinement proposes LRs from each run's own results: the two runs would differ
# every stop rule off: no Optuna rule, divergence thresholds nothing reaches, no trainer-side smoothed-loss stop
# (the trainer's own stop on a non-finite loss cannot be switched off)
UNPRUNED = ["pruning.rule=none", "pruning.divergence.factor=1.0e9", "pruning.divergence.spike=1.0e9", "train.stop_factor=null"]
# --quick: smoke.yaml (tiny model), full fine-tuning at 3 rates, one of which diverges; the pruned run adds a median
# rule, which a grid allows one trial at a time. YAML needs the dot in 1.0e-3 (a bare 1e-3 is a string).
QUICK_BOTH = ["space.method=[full]", "space.learning_rate=[1.0e-3, 3.0e-2, 3.0]", "search.max_concurrent=1",
              "train.memorization=false", "train.forgetting=false"]
QUICK_PRUNED = ["pruning.rule=median", "pruning.startup_trials=1", "pruning.warmup_reports=1"]
KINDS, LABELS = ("pruned", "unpruned"), {"pruned": "with pruning", "unpruned": "without pruning"}


def _first_past(record, divergence: dict) -> int | None:
    """The first report (from 1) at which the stopper's own rule, replayed on the unpruned history, would fire."""
    from sweeps.launch.pruning import DivergenceMonitor
    monitor = DivergenceMonitor(divergence["factor"], divergence["spike"], 1)  # the threshold, not the spec's grace
    for i, report in enumerate(record.history, 1):
        result = {k: (math.nan if v is None and k in ("train_loss", "train_loss_ema", "grad_norm") else v)
                  for k, v in report.items()}  # trials.json stores a non-finite value as null
        if i == len(record.history):
            result.update(status=record.final.get("status"), reason=record.final.get("reason"))
        if monitor.update(result) is not None:
            return i
    return None


def measure(dirs: dict[str, Path]) -> dict:
    from sweeps.launch.space import n_trials
    from sweeps.results.records import read_trials
    from sweeps.results.tradeoff import best_record
    from sweeps.spec import SweepSpec

    def _steps(r) -> int:  # optimizer steps a trial took
        return int(r.history[-1].get("step") or 0) if r.history else 0

    def _diverged(r) -> bool:
        return (r.stopped_by or "").startswith("diverged") or r.final.get("status") == "diverged"

    spec = SweepSpec.model_validate(json.loads((dirs["pruned"] / "spec.json").read_text())["spec"])
    keys, div = list(spec.space), spec.pruning.divergence.model_dump()
    runs = {k: read_trials(d / "trials.json") for k, d in dirs.items()}

    def count(pred) -> dict[str, int]:  # each run's trials for which pred holds
        return {k: sum(map(pred, v)) for k, v in runs.items()}
    cells = {k: {tuple(f"{r.config.get(f):.6g}" if isinstance(r.config.get(f), float) else str(r.config.get(f)) for f in keys): r
                 for r in recs} for k, recs in runs.items()}
    both = sorted(set(cells["pruned"]) & set(cells["unpruned"]))
    steps = {k: sum(_steps(cells[k][c]) for c in both) for k in cells}
    best = {k: best_record(recs, spec.search.mode) for k, recs in runs.items()}  # as `finetune export` picks it
    latency = []
    for c in both:
        p, first = cells["pruned"][c], _first_past(cells["unpruned"][c], div)
        if (caught := _diverged(p)) or first is not None:
            stop = len(p.history)
            latency.append({**dict(zip(keys, c)), "first": first, "stop": stop, "caught": caught,
                            "latency": stop - first if caught and first else None,
                            "after_grace": stop - max(first, div["min_reports"]) if caught and first else None})
    return {"keys": keys, "grid": n_trials(spec), "trials": {k: len(v) for k, v in runs.items()}, "matched": len(both),
            "steps": steps, "saved": 1 - steps["pruned"] / steps["unpruned"] if steps["unpruned"] else None,
            "rule": spec.pruning.rule, "median_stops": count(lambda r: (r.stopped_by or "").startswith("pruned")),
            "diverged": count(_diverged), "failed": count(lambda r: r.outcome == "failed"),
            "best": {k: ({**{f: b.config.get(f) for f in keys}, "objective": b.objective, "outcome": b.outcome} if b else None)
                     for k, b in best.items()},
            "same_best": None if None in best.values() else
            all(best["pruned"].config.get(f) == best["unpruned"].config.get(f) for f in keys),
            "latency": latency, "max_latency": max((r["latency"] for r in latency if r["latency"] is not None), default=None),
            "missed": sum(not r["caught"] for r in latency), "divergence": div, "metric": spec.search.metric,
            "cells": [{**dict(zip(keys, c)), **{f"steps_{k}": _steps(cells[k][c]) for k in KINDS},
                       **{f"outcome_{k}": cells[k][c].outcome for k in KINDS}} for c in both]}


def main(argv: list[str] | None = None) -> None:
    args, rep = cli(__doc__, __file__, argv, {"spec": "search_spaces/smoke.yaml"}, spec="search_spaces/lr.yaml",
                    set=[], keep="")  # set: overrides for both runs; keep: a folder for the two sweeps (else temporary)
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        out = Path(args.keep or tmp).resolve()

        def one(kind: str) -> float:
            name, extra = f"pruning-{kind}", (QUICK_BOTH + (QUICK_PRUNED if kind == "pruned" else [])) if args.quick else []
            ov = [*BOTH, *extra, *args.set, *(UNPRUNED if kind == "unpruned" else []), f"tracking.experiment={name}"]
            # one MLflow store per sweep: two sweeps creating one SQLite store at once race on its schema
            t = run_sweep(args.spec, name, out, ov, f"sqlite:///{out / name}.mlflow.db")
            rep(f"{kind}: {t['wall_s']:.0f} s: python sweeps/run.py {args.spec} {' '.join(t['overrides'])}")
            return t["wall_s"]

        # one after the other (side by side they would share the cores); --quick: side by side, a smoke run
        with ThreadPoolExecutor(2 if args.quick else 1) as pool:
            walls = dict(zip(KINDS, pool.map(one, KINDS)))
        m = {**measure({k: out / f"pruning-{k}" for k in KINDS}), "wall_s": walls}
    rep("", f"matched grid cells: {m['matched']} of the grid's {m['grid']} (trials: {m['trials']['pruned']} with pruning, "
            f"{m['trials']['unpruned']} without)", "")
    counts = {f"optimizer steps ({m['matched']} matched cells)": "steps", f"stopped by the {m['rule']} rule": "median_stops",
              "stopped as diverged": "diverged", "failed": "failed"}  # a grid (rule none) has no Optuna rule's row
    saved = f"**{fmt(100 * m['saved'] if m['saved'] is not None else None, 0)}%** (target >= 30%)"
    rep.table(["", *LABELS.values(), "saved"], [[label, *(m[key][k] for k in KINDS), saved if key == "steps" else ""]
                                                for label, key in counts.items() if key != "median_stops" or m["rule"] != "none"],
              f"Stop rules: divergence factor {m['divergence']['factor']:g}, spike {m['divergence']['spike']:g}, not before "
              f"report {m['divergence']['min_reports']}; Optuna rule: {m['rule']}"
              + (" (a grid prunes by the divergence rules only)" if m["rule"] == "none" else ""))
    same = {True: "yes", False: "NO", None: "cannot tell"}[m["same_best"]]
    rep.table(["run", *m["keys"], f"objective ({m['metric']})", "outcome"],
              [[LABELS[k], *(b[f] for f in m["keys"]), f"{b['objective']:.4f}", b["outcome"]] for k, b in m["best"].items() if b],
              f"Best configuration (a completed trial, as `finetune export` picks it), the same in both runs: {same}")
    rep.table([*m["keys"], "past threshold at report #", "stopped at report #", "latency (reports)", "after the grace"],
              [[*(r[f] for f in m["keys"]), r["first"] or "never", r["stop"] if r["caught"] else "not stopped",
                fmt(r["latency"], 0), fmt(r["after_grace"], 0)] for r in m["latency"]] or [["-"] * (len(m["keys"]) + 4)],
              f"Divergence latency (the unpruned history replayed through sweeps.launch.pruning.DivergenceMonitor): worst "
              f"{fmt(m['max_latency'], 0)} (target <= 1); past the threshold, never stopped: {m['missed']}")
    rep.table([*m["keys"], "steps with pruning", "steps without", "outcome with pruning", "outcome without"],
              [[*(c[f] for f in m["keys"]), c["steps_pruned"], c["steps_unpruned"], c["outcome_pruned"], c["outcome_unpruned"]]
               for c in m["cells"]], "All matched cells:")
    rep.save(m)


if __name__ == "__main__":
    entry(main, globals())
