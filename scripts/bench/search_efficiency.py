"""Search efficiency (BENCHMARKS.md section 4): best held-out loss after k/2 and k trials of our TPE and random search
and HF's Optuna search (TPE), over one spec's space, the same search seeds."""
import math
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: this checkout's packages

import optuna

from scripts.bench._harness import ROOT, child, cli, entry, fmt, run_sweep, timed
from sweeps.launch.space import DefineByRun
from sweeps.results.records import read_trials
from sweeps.spec import load_spec, trial_config

SEARCHERS = {"ours tpe": "tpe", "ours random": "random", "HF optuna": None}


def values(study) -> list[dict]:
    """Each trial's value as Optuna was told it, in the order it proposed them: a completed trial's objective; none for
    a pruned, diverged or failed one (the same rule both sides)."""
    return [{"number": t.number, "params": t.params, "value": t.value if t.value is not None and math.isfinite(t.value)
             else None} for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]


def run_ours(args, searcher: str, seed: int, out: Path) -> dict:
    """``sweeps/run.py SPEC search.algorithm=A search.seed=S``: its Optuna study's trials, the base model's loss."""
    name = f"se-{SEARCHERS[searcher]}-s{seed}"
    t = run_sweep(args.spec, name, out, [f"search.algorithm={SEARCHERS[searcher]}", f"search.seed={seed}",
                                         f"search.n_trials={args.trials}"], f"sqlite:///{out / name}.mlflow.db")
    trials = values(optuna.load_study(study_name=name, storage=f"sqlite:///{out / name / 'optuna.db'}"))
    l0 = next((r.final["l0"] for r in read_trials(out / name / "trials.json") if r.final.get("l0") is not None), None)
    return {"searcher": searcher, "seed": seed, "wall_s": t["wall_s"], "trials": trials, "l0": l0}


def hf_search(spec: str, n_trials: int, seed: int) -> dict:
    """(In a fresh process.) ``Trainer.hyperparameter_search`` with TPE (seeded) over the sweep's own define-by-run space."""
    import torch

    from scripts.bench import _hf
    spec = load_spec(ROOT / spec, [f"search.n_trials={n_trials}", f"search.seed={seed}"])
    space, storage = DefineByRun(spec), optuna.storages.InMemoryStorage()
    # transformers 5 calls model_init before hp_space: both suggest (Optuna repeats a trial's values); one eval, at the end
    _hf.search(spec.base, lambda trial: space(trial) or trial_config(spec.base, trial.params), n_trials, cadence=False,
               sampler=optuna.samplers.TPESampler(seed=seed), storage=storage, study_name="hf")
    return {"trials": values(optuna.load_study(study_name="hf", storage=storage)), "threads": torch.get_num_threads()}


def run_hf(args, searcher: str, seed: int, _out: Path) -> dict:
    res, wall = timed(child, __file__, "hf_search", args.spec, args.trials, seed)
    return {"searcher": searcher, "seed": seed, "wall_s": wall, **res}


def best_after(trials: list[dict], k: int) -> float | None:
    return min((t["value"] for t in trials[:k] if t["value"] is not None), default=None)


def main(argv: list[str] | None = None) -> None:
    args, rep = cli(__doc__, __file__, argv, {"seeds": "0", "trials": 4}, spec="search_spaces/tpe.yaml", seeds="0,1,2",
                    trials=16)  # trials per search: the best after half and after all
    seeds, ks = [int(s) for s in args.seeds.split(",")], (args.trials // 2, args.trials)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        for seed in seeds:  # the three searches one after the other; --quick: side by side (each sweep its own Ray)
            with ThreadPoolExecutor(3 if args.quick else 1) as pool:
                runs += pool.map(lambda s, seed=seed: (run_ours if SEARCHERS[s] else run_hf)(args, s, seed, Path(tmp)), SEARCHERS)
    l0 = next((r["l0"] for r in runs if r.get("l0") is not None), None)
    rep(f"spec {args.spec}: {args.trials} trials per search, seeds {args.seeds}; base eval loss l0 {fmt(l0, 3)}; HF sequential "
        f"with {runs[-1]['threads']} torch threads; ours as many at a time as the spec's resources allow", "")
    summary = {}
    for s in SEARCHERS:
        mine = [r for r in runs if r["searcher"] == s]
        per = {k: [best_after(r["trials"], k) for r in mine] for k in ks}
        med = {k: statistics.median(v) if (v := [x for x in per[k] if x is not None]) else None for k in ks}
        summary[s] = {"per_seed": per, "median": med, "wall_s": statistics.median(r["wall_s"] for r in mine)}
    rep.table(["searcher", *(f"median best after {k}" for k in ks), "median wall s"],  # each seed's: the next table
              [[s, *(fmt(v["median"][k], 3) for k in ks), fmt(v["wall_s"], 0)] for s, v in summary.items()],
              "Best held-out eval loss found (lower is better):")
    rep.table(["searcher", "seed", *(f"best after {k}" for k in ks), "finite / trials", "wall s"],
              [[r["searcher"], r["seed"], *(fmt(best_after(r["trials"], k), 3) for k in ks),
                f"{sum(t['value'] is not None for t in r['trials'])} / {len(r['trials'])}", fmt(r["wall_s"], 0)] for r in runs],
              "Per seed:")
    tpe, rnd = summary["ours tpe"], summary["ours random"]
    pairs = [(a, b) for a, b in zip(tpe["per_seed"][ks[1]], rnd["per_seed"][ks[1]]) if a is not None and b is not None]
    rep(f"TPE vs random at {ks[1]}: median {fmt(tpe['median'][ks[1]], 3)} vs {fmt(rnd['median'][ks[1]], 3)}; "
        f"TPE <= random in {sum(a <= b for a, b in pairs)} of {len(pairs)} seeds")
    rep.save({"ks": ks, "l0": l0, "summary": summary, "runs": runs})


if __name__ == "__main__":
    entry(main, globals())
