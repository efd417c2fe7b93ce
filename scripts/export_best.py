"""Export the best trial of a sweep for the production fine-tune.

    python scripts/export_best.py sweeps_out/lr-instability
    python scripts/export_best.py sweeps_out/lr-instability --method lora
    python -m trainer.train sweeps_out/lr-instability/export/best.yaml

Writes best.yaml (a trainer config that saves the model or adapter), the same
settings as Hugging Face TrainingArguments and PEFT LoraConfig JSON, OpenAI
fine-tuning hyperparameters, and provenance. Pruned, diverged and failed
trials are never exported.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import yaml

from trainer.errors import UserError, cli_errors


def trial_config(record, sweep_dir: Path) -> dict:
    """The trial's full TrainConfig fields (the sweep's fixed settings plus the sampled values)."""
    from sweeps.spec import SweepSpec
    from trainer.config import TrainConfig

    spec_file = Path(sweep_dir) / "spec.json"
    base = SweepSpec.model_validate(json.loads(spec_file.read_text())["spec"]).base_train() if spec_file.is_file() else {}
    merged = {**base, **{k: v for k, v in record.config.items() if k != "cell"}}
    return TrainConfig.model_validate(merged).model_dump(mode="json")


def pick(records, *, metric: str | None, mode: str, method: str | None):
    from sweeps.finish import best_record

    if metric:
        for r in records:
            value = r.final.get(metric)
            r.objective = value if isinstance(value, (int, float)) else None
    best = best_record(records, mode, method)
    if best is None:
        mine = [r for r in records if method is None or r.method == method]
        counts = ", ".join(f"{n} {o}" for o, n in Counter(r.outcome for r in mine).items()) or "no trials"
        what = f"of method {method} " if method else ""
        raise UserError(f"no completed trial {what}to export ({counts}); pruned, diverged and failed trials are never exported")
    return best


def export(record, cfg: dict, out: Path, *, sweep: str, sweep_dir: Path, metric: str) -> list[Path]:
    from sweeps.tracking import scrub
    from trainer.outputs import provenance

    out.mkdir(parents=True, exist_ok=True)
    prod = {**cfg, "save_model": True, "output_dir": f"runs/best-{cfg['method']}", "fault": None}
    files = {"best.yaml": f"# python -m trainer.train {out / 'best.yaml'}\n" + yaml.safe_dump(scrub(prod), sort_keys=False)}
    hf = {
        "learning_rate": cfg["learning_rate"], "per_device_train_batch_size": cfg["batch_size"],
        "gradient_accumulation_steps": cfg["grad_accum"], "warmup_ratio": cfg["warmup_ratio"],
        "lr_scheduler_type": cfg["scheduler"], "weight_decay": cfg["weight_decay"],
        "max_grad_norm": cfg["max_grad_norm"] or 0.0, "seed": cfg["seed"], "optim": "adamw_torch_fused",
        "logging_nan_inf_filter": False,
        **({"max_steps": cfg["max_steps"]} if cfg["max_steps"] else {"num_train_epochs": cfg["epochs"]}),
    }
    files["hf_training_args.json"] = json.dumps(hf, indent=2)
    if cfg["method"] == "lora":
        files["lora_config.json"] = json.dumps({
            "r": cfg["lora_r"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": cfg["lora_dropout"],
            "target_modules": cfg["lora_target_modules"], "task_type": "CAUSAL_LM"}, indent=2)
    files["openai.json"] = json.dumps({
        "hyperparameters": {"n_epochs": cfg["epochs"], "batch_size": cfg["batch_size"]},
        "note": "learning_rate_multiplier is not derived: the API's base learning rate is unknown, so this "
                "sweep's absolute learning rate does not carry over.",
    }, indent=2)
    prov = provenance()
    files["provenance.json"] = json.dumps({
        "sweep": sweep, "sweep_dir": str(sweep_dir), "trial_id": record.trial_id, "mlflow_run_id": record.mlflow_run_id,
        "metric": metric, "value": record.objective, "outcome": record.outcome, **prov}, indent=2)
    paths = []
    for name, text in files.items():
        (out / name).write_text(scrub(text))
        paths.append(out / name)
    return paths


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/export_best.py", description="Export a sweep's best trial.")
    parser.add_argument("sweep", help="the sweep folder (sweeps_out/NAME) or its MLflow experiment name")
    parser.add_argument("--metric", help="rank by this final metric instead of the sweep's objective")
    parser.add_argument("--mode", choices=["min", "max"], default="min")
    parser.add_argument("--method", help="the best trial of this method only (e.g. lora)")
    parser.add_argument("--out", help="output folder (default: SWEEP/export)")
    args = parser.parse_args(argv)

    from sweeps.report import load_sweep

    records, where = load_sweep(args.sweep)
    sweep_dir = Path(str(where))
    if not (sweep_dir / "spec.json").is_file():
        raise UserError(f"{args.sweep}: the sweep folder is not on this machine; export needs it (its spec.json)")
    best = pick(records, metric=args.metric, mode=args.mode, method=args.method)
    cfg = trial_config(best, sweep_dir)
    out = Path(args.out) if args.out else sweep_dir / "export"
    metric = args.metric or "objective (the sweep's search.metric)"
    paths = export(best, cfg, out, sweep=sweep_dir.name, sweep_dir=sweep_dir, metric=metric)
    print(f"best trial {best.trial_id}: {cfg['method']} lr={cfg['learning_rate']:.3g} bs={cfg['batch_size']} "
          f"epochs={cfg['epochs']}  {metric}={best.objective:.4f}")
    for p in paths:
        print(f"  wrote {p}")
    print(f"train it:  python -m trainer.train {out / 'best.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
