"""Search efficiency: the best held-out loss found after 8 and 16 trials by TPE, random search and HF's Optuna search.

    python scripts/bench/search_efficiency.py                  # search_spaces/tpe.yaml, 16 trials, seeds 0,1,2 (about 10 min on an idle 2-core CPU)
    python scripts/bench/search_efficiency.py --quick          # 1 seed, 4 trials per searcher: keeps the script from rotting
    python scripts/bench/search_efficiency.py --seeds 0,1,2,3,4 --json search.json --out /tmp/search-bench

Three searchers over the space of one spec (``search_spaces/tpe.yaml``: learning
rate 1e-5..1e-1 log, method, batch size, LoRA rank when LoRA; the tiny model on
``builtin:facts``, 2 epochs), each with the same search seeds:

- ``ours tpe``: ``python sweeps/run.py SPEC search.algorithm=tpe search.seed=S``
  (Ray Tune, Optuna's ``TPESampler(seed=S)``, no pruning rule in the spec);
- ``ours random``: the same with ``search.algorithm=random`` (``RandomSampler(seed=S)``);
- ``HF optuna``: ``transformers.Trainer.hyperparameter_search(backend="optuna")``
  with its default sampler, TPE, passed as ``sampler=TPESampler(seed=S)``. The
  trials sample the sweep's own define-by-run space (``sweeps.space.DefineByRun``:
  the same names, distributions, conditions and order); ``model_init`` loads the
  model and applies the method's ``prepare`` with the trial's ``TrainConfig``;
  the data are tokenized by ``trainer.data`` (completion-only labels); the
  objective is HF's ``eval_loss`` on the spec's eval set in one batch, which is
  the completion-token mean our trainer reports. One subprocess per seed.

Best after k: trials in the order the sampler proposed them (Optuna's
``trial.number``; our sweeps' trials are matched to the study in
``<sweep>/optuna.db`` by their parameters), the running minimum of the finite
objectives among the first k (ours: ``objective`` from ``trials.json``, a
diverged trial counts as min(eval loss, l0); HF: a NaN loss is a FAIL in Optuna
and counts as nothing). Medians over seeds. Wall time is the whole process
(Python start, Ray start and the sweep's report for ours). Ours runs trials
concurrently (as many as the resources allow: 2 on 2 cores), so TPE sees a
result a trial or two later than HF's sequential search. A benchmark, not a
test: nothing is asserted.

Read the columns knowing how TPE starts: ``TPESampler`` proposes its first
``n_startup_trials`` with an internal ``RandomSampler(seed)``, so with the same
seed TPE and random propose the same first trials (checked with optuna 5.0).
The spec keeps Optuna's default ``search.startup_trials: 10``, as HF does, so
after 8 trials ours tpe = ours random by construction, and at 16 the comparison
is paired: 6 TPE-guided proposals (5 while 2 trials run at a time) against 6
random ones. (With ``startup_trials: 5`` TPE did worse than random at 16 in a
first run: BENCHMARKS.md.)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a file: import this checkout's packages

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SPEC = "search_spaces/tpe.yaml"
SEARCHERS = ("ours tpe", "ours random", "HF optuna")
_ALGORITHM = {"ours tpe": "tpe", "ours random": "random"}


# --- ours: one sweep through the CLI ---------------------------------------------------


def _run_ours(args, searcher: str, seed: int, out: Path) -> dict:
    """One ``sweeps/run.py`` sweep in its own process (its own local Ray); its trials in proposal order."""
    name = f"se-{_ALGORITHM[searcher]}-s{seed}"
    cmd = [sys.executable, "sweeps/run.py", args.spec, f"name={name}", f"search.algorithm={_ALGORITHM[searcher]}",
           f"search.seed={seed}", f"search.n_trials={args.trials}", f"output_dir={out}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}  # never the user's store
    proc, wall = _timed(cmd, env)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {"searcher": searcher, "seed": seed, "wall_s": wall, "trials": _ours_trials(out / name, name)}


def _timed(cmd: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    return proc, time.perf_counter() - t0


def _ours_trials(sweep_dir: Path, study_name: str) -> list[dict]:
    """The sweep's trials in Optuna's ``trial.number`` order, each with its objective from ``trials.json``.

    Ray's trial ids are not sequential; the study's numbers are the order in which the
    sampler proposed, and a trial's parameters identify its record.
    """
    import optuna

    from sweeps.records import load_records

    records = load_records(sweep_dir / "trials.json")
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    rows = []
    for ot in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        match = [r for r in records if _same_params(ot.params, r.config)]
        record = match[0] if len(match) == 1 else None
        rows.append({"number": ot.number, "params": ot.params,
                     "value": record.objective if record else None,
                     "outcome": record.outcome if record else f"unmatched ({len(match)} records)"})
    return rows


def _same_params(params: dict, config: dict) -> bool:
    def same(a, b) -> bool:
        if isinstance(a, float) or isinstance(b, float):
            return isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
        return a == b

    return all(key in config and same(value, config[key]) for key, value in params.items())


# --- HF: Trainer.hyperparameter_search in a subprocess ----------------------------------


def _run_hf(args, seed: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-one", str(seed), "--spec", args.spec,
           "--trials", str(args.trials)]
    proc, wall = _timed(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"HF search seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {"searcher": "HF optuna", "seed": seed, "wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _trial_config(spec, params: dict):
    """The trial's TrainConfig: the spec's fixed fields plus the sampled values (as sweeps.trial builds it)."""
    return spec.base.model_copy(update=params)


def _hf_fields(cfg, n_train: int) -> dict:
    """TrainingArguments fields that follow the trial's TrainConfig: the export's conversion (the one function that
    maps a TrainConfig to HF), less its optimizer: this benchmark runs HF's default one (and reports which)."""
    from sweeps.export import hf_training_args

    fields = hf_training_args(cfg, n_train)
    fields.pop("optim")
    return fields


def _hf_data(cfg, tokenizer):
    """Train and eval examples exactly as our loop reads them, in HF's dict form (labels -100 off the completion)."""
    from scripts.bench.trainer_throughput import _HFDataset
    from trainer.data import load_records, split_records, tokenize

    records = load_records(cfg.train_data)
    train, ev = split_records(records, cfg.eval_data, cfg.eval_fraction, cfg.seed)
    if cfg.max_examples:
        train = train[: cfg.max_examples]
    return _HFDataset(tokenize(train, tokenizer, cfg.seq_len)), _HFDataset(tokenize(ev, tokenizer, cfg.seq_len))


def _hf_search(spec_path: str, n_trials: int, seed: int, tmp: str) -> dict:
    """``Trainer.hyperparameter_search`` over the spec's space; returns its trials in ``trial.number`` order."""
    import optuna
    import torch
    from transformers import Trainer, TrainingArguments

    from scripts.bench.trainer_throughput import _PadCollator
    from sweeps.space import DefineByRun
    from sweeps.spec import load_spec
    from trainer.methods import get_method
    from trainer.models import load_model, load_tokenizer, resolve_model_dir

    spec = load_spec(spec_path, [f"search.n_trials={n_trials}", f"search.seed={seed}"])
    base = _trial_config(spec, {})
    tokenizer = load_tokenizer(resolve_model_dir(base.model))
    train_ds, eval_ds = _hf_data(base, tokenizer)
    space = DefineByRun(spec)

    def hp_space(trial) -> dict:
        space(trial)  # the sweep's own suggest_* calls; method, lora_r, ... are read back in model_init
        return _hf_fields(_trial_config(spec, trial.params), len(train_ds))

    def model_init(trial):
        if trial is not None:  # transformers 5 calls model_init before hp_space: suggest here (Optuna repeats the values)
            space(trial)
        cfg = _trial_config(spec, trial.params if trial is not None else {})
        model, _ = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
        return get_method(cfg.method).prepare(model, cfg)

    targs = TrainingArguments(
        output_dir=str(Path(tmp) / "hf_out"), **_hf_fields(base, len(train_ds)),  # NaN losses shown, as ours
        per_device_eval_batch_size=len(eval_ds),  # one batch: HF's eval_loss is then the mean over all completion tokens
        label_names=["labels"],  # a peft-wrapped model hides `labels` from HF's signature sniffing
        report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, remove_unused_columns=False,
    )
    trainer = Trainer(model_init=model_init, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=_PadCollator(tokenizer.pad_token_id))
    storage = optuna.storages.InMemoryStorage()  # kept here, so the study can be read back afterwards
    trainer.hyperparameter_search(
        hp_space=hp_space, compute_objective=lambda metrics: metrics["eval_loss"], n_trials=n_trials,
        direction="minimize", backend="optuna", sampler=optuna.samplers.TPESampler(seed=seed),  # HF's default sampler, seeded
        storage=storage, study_name=f"hf-s{seed}",
    )
    study = optuna.load_study(study_name=f"hf-s{seed}", storage=storage)
    trials = [{"number": t.number, "params": t.params, "state": t.state.name,
               "value": t.value if t.value is not None and math.isfinite(t.value) else None}
              for t in sorted(study.trials, key=lambda t: t.number)]
    return {"trials": trials, "threads": torch.get_num_threads(), "hf_optim": str(getattr(targs.optim, "value", targs.optim))}


def _hf_one(args) -> int:
    """One HF search in this fresh process; prints one JSON line."""
    import optuna

    from trainer.quiet import quiet_libraries

    quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-hf-search-") as tmp:
        print(json.dumps(_hf_search(args.spec, args.trials, args.hf_one, tmp)))
    return 0


# --- figures and tables --------------------------------------------------------------


def _best_after(trials: list[dict], k: int) -> float | None:
    values = [t["value"] for t in trials[:k] if t["value"] is not None]
    return min(values) if values else None


def _best_trial(trials: list[dict]) -> dict | None:
    done = [t for t in trials if t["value"] is not None]
    return min(done, key=lambda t: t["value"]) if done else None


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _summary(runs: list[dict], ks: tuple[int, int]) -> dict[str, dict]:
    out = {}
    for searcher in SEARCHERS:
        mine = sorted((r for r in runs if r["searcher"] == searcher), key=lambda r: r["seed"])
        per_seed = {k: [_best_after(r["trials"], k) for r in mine] for k in ks}
        out[searcher] = {"seeds": [r["seed"] for r in mine], "per_seed": per_seed,
                         "median": {k: _median(v) for k, v in per_seed.items()},
                         "wall_s": statistics.median(r["wall_s"] for r in mine)}
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(summary: dict, ks: tuple[int, int]) -> list[str]:
    k1, k2 = ks
    lines = [f"| searcher | median best after {k1} | median best after {k2} | per seed after {k1} | "
             f"per seed after {k2} | median wall s |", "|---|---|---|---|---|---|"]
    for searcher, s in summary.items():
        lines.append(f"| {searcher} | {_fmt(s['median'][k1])} | {_fmt(s['median'][k2])} | "
                     f"{' / '.join(_fmt(v) for v in s['per_seed'][k1])} | {' / '.join(_fmt(v) for v in s['per_seed'][k2])} | "
                     f"{s['wall_s']:.0f} |")
    return lines


def _seed_table(runs: list[dict], ks: tuple[int, int]) -> list[str]:
    lines = [f"| searcher | seed | best after {ks[0]} | best after {ks[1]} | best trial (number: params) | finite / trials | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (SEARCHERS.index(r["searcher"]), r["seed"])):
        best = _best_trial(r["trials"][: ks[1]])
        what = f"{best['number']}: {_params_text(best['params'])}" if best else "-"
        finite = sum(t["value"] is not None for t in r["trials"])
        lines.append(f"| {r['searcher']} | {r['seed']} | {_fmt(_best_after(r['trials'], ks[0]))} | "
                     f"{_fmt(_best_after(r['trials'], ks[1]))} | {what} | {finite} / {len(r['trials'])} | {r['wall_s']:.0f} |")
    return lines


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _verdict(summary: dict, k: int) -> str:
    tpe, rnd = summary["ours tpe"], summary["ours random"]
    a, b = tpe["median"][k], rnd["median"][k]
    if a is None or b is None:
        return f"TPE vs random at {k}: no finite result to compare"
    pairs = [(x, y) for x, y in zip(tpe["per_seed"][k], rnd["per_seed"][k]) if x is not None and y is not None]
    wins = sum(x <= y for x, y in pairs)
    met = "no worse (target met)" if a <= b else f"worse by {a - b:.3f} (target missed)"
    return (f"TPE vs random at {k}: median {a:.3f} vs {b:.3f}: TPE {met}; "
            f"TPE <= random in {wins} of {len(pairs)} seeds")


def _l0(runs: list[dict], out: Path) -> float | None:
    """The base model's eval loss, from the first of our sweeps (for scale)."""
    from sweeps.records import load_records

    for r in runs:
        if r["searcher"] in _ALGORITHM:
            name = f"se-{_ALGORITHM[r['searcher']]}-s{r['seed']}"
            for rec in load_records(out / name / "trials.json"):
                if rec.final.get("l0") is not None:
                    return rec.final["l0"]
    return None


def _cpu_model() -> str:
    from scripts.bench._common import cpu_model

    return cpu_model()


# --- the run ----------------------------------------------------------------------------


def _run_one(args, searcher: str, seed: int, out: Path) -> dict:
    return _run_hf(args, seed) if searcher == "HF optuna" else _run_ours(args, searcher, seed, out)


def _run_seed(args, seed: int, out: Path) -> list[dict]:
    """The three searches of one seed one after the other; in --quick mode side by side (each sweep its own Ray)."""
    if args.quick:  # a smoke run: the startups overlap, halving the wall time; the times are not a measurement
        with ThreadPoolExecutor(len(SEARCHERS)) as pool:
            return list(pool.map(lambda searcher: _run_one(args, searcher, seed, out), SEARCHERS))
    return [_run_one(args, searcher, seed, out) for searcher in SEARCHERS]


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=DEFAULT_SPEC, help="the sweep spec all three search (its search.algorithm, seed and n_trials are overridden)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated search seeds, the same for every searcher")
    p.add_argument("--trials", type=int, default=16, help="trials per search; best reported after half and after all")
    p.add_argument("--quick", action="store_true", help="1 seed, 4 trials per searcher (a smoke run, not a measurement)")
    p.add_argument("--out", metavar="DIR", help="keep the sweep folders and MLflow store here (default: a temp dir, removed)")
    p.add_argument("--json", metavar="OUT", help="also write every trial's value and the medians here")
    p.add_argument("--hf-one", type=int, metavar="SEED", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.trials = "0", 4
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if args.trials < 2:
        p.error("--trials must be >= 2")
    spec = Path(args.spec)
    args.spec = str(spec.resolve() if spec.is_file() else ROOT / spec)  # the sweeps run with cwd = the checkout
    if args.out and Path(args.out).is_dir() and any(Path(args.out).iterdir()):
        p.error(f"--out {args.out} is not empty: a sweep of the same name there would be resumed, not rerun")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.hf_one is not None:
        return _hf_one(args)
    from sweeps.spec import load_spec

    spec = load_spec(args.spec)  # fail fast on a bad spec, before any process starts
    ks = (args.trials // 2, args.trials)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        out = Path(args.out).resolve() if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        runs = [run for seed in args.seed_list for run in _run_seed(args, seed, out)]
        l0 = _l0(runs, out)
    summary = _summary(runs, ks)
    _print(args, argv, spec, runs, summary, ks, l0)
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": argv, "ks": ks, "l0": l0, "summary": summary, "runs": runs}, indent=1))
    return 0


def _print(args, argv, spec, runs, summary, ks, l0) -> None:
    import optuna
    import ray
    import torch
    import transformers

    cores = os.cpu_count() or 1
    concurrent = spec.search.max_concurrent or max(1, int(cores // spec.resources.cpu))
    hf = next(r for r in runs if r["searcher"] == "HF optuna")
    print(f"command: python scripts/bench/search_efficiency.py {shlex.join(argv)}".rstrip())
    print(f"spec {args.spec} ({spec.name}): model {spec.model}, {spec.data.train} -> {spec.data.eval}, "
          f"space {', '.join(spec.space)}; {args.trials} trials per search, seeds {args.seeds}; base eval loss l0 "
          f"{_fmt(l0)}; pruning rule {spec.pruning.rule} (divergence stop on, ours only)")
    print(f"ours: up to {concurrent} trials at a time ({spec.resources.cpu:g} CPU and torch thread(s) each); "
          f"HF: sequential, {hf['threads']} torch threads, optim {hf['hf_optim']}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, optuna {optuna.__version__}, "
          f"ray {ray.__version__}; CPU {_cpu_model()}, {cores} cores")
    if args.quick:
        print("--quick: a smoke run (the three searches side by side); the numbers below are not a measurement")
    print(f"\nBest held-out eval loss found (lower is better), median over {len(args.seed_list)} seed(s):\n")
    print("\n".join(_table(summary, ks)))
    print("\nPer seed:\n")
    print("\n".join(_seed_table(runs, ks)))
    print(f"\n{_verdict(summary, ks[1])}")


if __name__ == "__main__":
    sys.exit(main())
