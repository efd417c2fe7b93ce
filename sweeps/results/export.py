"""Export the best trial of a sweep for the production fine-tune (``finetune export``).

    finetune export sweeps_out/lr-instability
    finetune export sweeps_out/lr-instability --method lora
    finetune export sweeps_out/lr-instability --max-forgetting 0.5   # within a forgetting budget
    finetune export sweeps_out/lr-instability --pareto               # print the front, export nothing
    python -m trainer.train sweeps_out/lr-instability/export/best.yaml

Writes best.yaml (a trainer config that saves the model or adapter), the same
settings as Hugging Face TrainingArguments, the model's loading arguments (dtype, attention; for a 4-bit base
its BitsAndBytesConfig) and, for an adapter method, its PEFT config JSON (each loads with ``Cls(**json.load(f))``),
OpenAI fine-tuning hyperparameters, and
provenance, which records the rule that chose the trial. Pruned, diverged and
failed trials are never exported. A plain export warns when the trial it picks
forgets more than FORGETTING_BOUND nats and names the best trial within it.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import yaml

from sweeps.results.mlflow_records import load_sweep
from sweeps.results.records import scrub
from sweeps.results.tradeoff import best_record, finished, front, is_number, label, points, ppl_factor, varied_keys
from sweeps.spec import SweepSpec, sampled_settings
from trainer.config import TrainConfig
from trainer.errors import UserError, cli_errors, prog_name
from trainer.methods import get_method
from trainer.outputs import provenance


def record_config(record, sweep_dir: Path) -> TrainConfig:
    """A finished trial's TrainConfig (the sweep's fixed settings plus its sampled settings), validated once: a
    finished sweep is read back from its files, which is a boundary like the spec's YAML."""
    spec_file = Path(sweep_dir) / "spec.json"
    base = SweepSpec.model_validate(json.loads(spec_file.read_text())["spec"]).base_train() if spec_file.is_file() else {}
    merged = {**base, **sampled_settings(record.config)}
    return TrainConfig.model_validate(merged)


# nats of reference-text NLL change above which a plain export warns: exp(0.5) = 1.65x the base model's perplexity
FORGETTING_BOUND = 0.5


def within(records, max_forgetting: float | None):
    """The trials whose measured forgetting is at most ``max_forgetting`` nats (all of them for None)."""
    if max_forgetting is None:
        return list(records)
    return [r for r in records if is_number(r.final.get("forgetting")) and r.final["forgetting"] <= max_forgetting]


def pick(records, *, metric: str | None, mode: str, method: str | None, max_forgetting: float | None = None):
    """The best completed trial by the rule; raises UserError (exit 2) when no trial fits it."""
    if metric:
        for r in records:
            value = r.final.get(metric)
            r.objective = value if isinstance(value, (int, float)) else None
    best = best_record(within(records, max_forgetting), mode, method)
    if best is not None:
        return best
    what = f"of method {method} " if method else ""
    if max_forgetting is not None and best_record(records, mode, method) is not None:
        raise UserError(_over_budget(records, method, max_forgetting))
    mine = [r for r in records if method is None or r.method == method]
    counts = ", ".join(f"{n} {o}" for o, n in Counter(r.outcome for r in mine).items()) or "no trials"
    raise UserError(f"no completed trial {what}to export ({counts}); pruned, diverged and failed trials are never exported")


def _over_budget(records, method: str | None, max_forgetting: float) -> str:
    what = f" of method {method}" if method else ""
    done = [r for r in records if finished(r) and (method is None or r.method == method)]
    measured = [r for r in done if is_number(r.final.get("forgetting"))]
    if not measured:
        return (f"--max-forgetting {max_forgetting:g}: no completed trial{what} measured its forgetting "
                "(the sweep's train.forgetting: true measures it)")
    least = min(measured, key=lambda r: r.final["forgetting"])
    return (f"--max-forgetting {max_forgetting:g}: no completed trial{what} forgot {max_forgetting:g} nats or less; "
            f"the least was trial {least.trial_id} ({_describe(least)}). Raise the budget, or see the "
            "trade-off with --pareto")


def rule_text(metric: str, mode: str, method: str | None, max_forgetting: float | None) -> str:
    """The rule that chose the trial, in words (kept in provenance.json)."""
    best = "lowest" if mode == "min" else "highest"
    rule = f"{best} {metric} among completed trials"
    if method:
        rule += f" of method {method}"
    if max_forgetting is not None:
        rule += f" whose forgetting (reference-text NLL change) is <= {max_forgetting:g} nats"
    return rule


def forgetting_warning(best, records, *, mode: str, method: str | None, sweep: str) -> str | None:
    """When the chosen trial forgets more than FORGETTING_BOUND: what it costs, and the best trial within it."""
    forgetting = best.final.get("forgetting")
    if not is_number(forgetting) or forgetting <= FORGETTING_BOUND:
        return None
    text = (f"warning: trial {best.trial_id} forgets {forgetting:+.2f} nats on the reference text: its perplexity "
            f"there is {ppl_factor(forgetting):.1f}x the base model's.")
    safe = best_record(within(records, FORGETTING_BOUND), mode, method)
    if safe is None:
        return text + f" No completed trial stays within {FORGETTING_BOUND} nats."
    return (text + f" The best trial within {FORGETTING_BOUND} nats is {safe.trial_id} ({_describe(safe)}); export it with:\n"
            f"  finetune export {sweep} --max-forgetting {FORGETTING_BOUND}")


def front_table(records, method: str | None, max_forgetting: float | None) -> str:
    """The trade-off front (held-out loss against forgetting) as a table; UserError when no trial measured both."""
    mine = [r for r in records if method is None or r.method == method]
    pts = [p for p in front(points(mine)) if max_forgetting is None or p.forgetting <= max_forgetting]
    if not pts:
        budget = f" within {max_forgetting:g} nats" if max_forgetting is not None else ""
        raise UserError(f"no completed trial{' of method ' + method if method else ''} measured both held-out loss and "
                        f"forgetting{budget}: there is no front to show")
    keys = varied_keys(records)
    head = f"{'trial':<14}{'settings':<34}{'held-out loss':>14}{'forgetting':>12}{'ref. ppl':>10}"
    lines = [f"trade-off front: {len(pts)} trial(s) that no other beats on both held-out loss and forgetting", head,
             "-" * len(head)]
    lines += [f"{p.record.trial_id:<14}{label(p.record, keys):<34}{p.loss:>14.4f}{p.forgetting:>+12.3f}"
              f"{ppl_factor(p.forgetting):>9.2f}x" for p in pts]
    return "\n".join(lines)


def _describe(r) -> str:
    return f"{label(r, ['batch_size', 'epochs', 'lora_r'])}, held-out loss {r.final.get('eval_loss', float('nan')):.3f}, " \
           f"forgetting {r.final.get('forgetting', float('nan')):+.2f}"


def export(record, tc, out: Path, *, sweep: str, sweep_dir: Path, metric: str, rule: str) -> list[Path]:
    """Write the export files of ``record``, whose TrainConfig is ``tc`` (``record_config``)."""
    from trainer.data import run_records  # torch: only an export that writes files needs it

    cfg = tc.model_dump(mode="json")
    try:
        n_train = len(run_records(tc)[0])  # the steps HF counts warmup in, and OpenAI's whole epochs, need it
    except UserError as exc:
        raise UserError(f"export needs the trial's training data: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    prod = {**cfg, "save_model": True, "output_dir": f"runs/best-{cfg['method']}", "fault": None}
    files = {"best.yaml": f"# python -m trainer.train {out / 'best.yaml'}\n" + yaml.safe_dump(scrub(prod), sort_keys=False)}
    files["hf_training_args.json"] = json.dumps(hf_training_args(tc, n_train), indent=2)
    method = get_method(tc.method)
    if method.peft_args is not None:  # the adapter's PEFT config, as the trial built it
        files[f"{method.name}_config.json"] = json.dumps(method.peft_args(tc), indent=2)
    files["model_kwargs.json"] = json.dumps(model_kwargs(tc), indent=2)
    if tc.quantization:  # transformers.BitsAndBytesConfig(**this): the 4-bit base the trial trained on
        from trainer.models import bnb_config  # torch, as run_records

        files["bnb_config.json"] = json.dumps(bnb_config(tc.dtype, as_dict=True), indent=2)
    files["openai.json"] = json.dumps(openai_hyperparameters(tc, n_train), indent=2)
    prov = provenance()
    files["provenance.json"] = json.dumps({
        "sweep": sweep, "sweep_dir": str(sweep_dir), "trial_id": record.trial_id, "mlflow_run_id": record.mlflow_run_id,
        "rule": rule, "metric": metric, "value": record.objective, "forgetting": record.final.get("forgetting"),
        "outcome": record.outcome, **prov}, indent=2)
    paths = []
    for name, text in files.items():
        (out / name).write_text(scrub(text))
        paths.append(out / name)
    return paths


def hf_training_args(tc, n_train: int) -> dict:
    """``transformers.TrainingArguments(**this)`` trains as the trial did (transformers 5 has no warmup_ratio: steps)."""
    total = tc.total_steps(n_train)
    return {
        "learning_rate": tc.learning_rate, "per_device_train_batch_size": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum, "warmup_steps": tc.warmup_steps(total),
        "lr_scheduler_type": tc.scheduler, "weight_decay": tc.weight_decay,
        "max_grad_norm": tc.max_grad_norm or 0.0, "seed": tc.seed, "optim": "adamw_torch_fused",
        "logging_nan_inf_filter": False,  # HF hides NaN losses in its logs by default
        **({"optim": "adamw_bnb_8bit"} if tc.optimizer == "adamw_8bit" else {}),
        **({"bf16": True} if tc.dtype == "bfloat16" else {}),
        **({"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}
           if tc.gradient_checkpointing else {}),
        **({"max_steps": tc.max_steps} if tc.max_steps else {"num_train_epochs": tc.epochs}),
    }


def model_kwargs(tc) -> dict:
    """``AutoModelForCausalLM.from_pretrained(model, **this)`` loads the model as the trial did (with
    ``quantization_config=BitsAndBytesConfig(**bnb_config.json)`` for a 4-bit base)."""
    return {"dtype": tc.dtype, "attn_implementation": tc.attn_implementation}


def openai_hyperparameters(tc, n_train: int) -> dict:
    """OpenAI fine-tuning hyperparameters: ``n_epochs`` must be a whole number of epochs."""
    epochs = tc.total_steps(n_train) * tc.examples_per_step / n_train if tc.max_steps else tc.epochs
    n_epochs = max(1, round(epochs))
    note = ("learning_rate_multiplier is not derived: the API's base learning rate is unknown, so this "
            "sweep's absolute learning rate does not carry over.")
    if abs(n_epochs - epochs) > 1e-9:
        note += f" The trial trained {epochs:g} epochs; the API takes whole epochs, so {n_epochs}."
    return {"hyperparameters": {"n_epochs": n_epochs, "batch_size": tc.batch_size}, "note": note}


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog_name("finetune export"), description="Export a sweep's best trial.")
    parser.add_argument("sweep", help="the sweep folder (sweeps_out/NAME) or its MLflow experiment name")
    parser.add_argument("--metric", help="rank by this final metric instead of the sweep's objective")
    parser.add_argument("--mode", choices=["min", "max"], default="min")
    parser.add_argument("--method", help="the best trial of this method only (e.g. lora)")
    parser.add_argument("--max-forgetting", type=float, metavar="NATS",
                        help="the best trial among those whose forgetting (reference-text NLL change) is <= NATS")
    parser.add_argument("--pareto", action="store_true",
                        help="print the trade-off front (held-out loss against forgetting) and export nothing")
    parser.add_argument("--out", help="output folder (default: SWEEP/export)")
    args = parser.parse_args(argv)

    records, where = load_sweep(args.sweep)
    if args.pareto:
        print(front_table(records, args.method, args.max_forgetting))
        return 0
    sweep_dir = Path(str(where))
    if not (sweep_dir / "spec.json").is_file():
        raise UserError(f"{args.sweep}: the sweep folder is not on this machine; export needs it (its spec.json)")
    best = pick(records, metric=args.metric, mode=args.mode, method=args.method, max_forgetting=args.max_forgetting)
    tc = record_config(best, sweep_dir)
    out = Path(args.out) if args.out else sweep_dir / "export"
    metric = args.metric or "objective (the sweep's search.metric)"
    rule = rule_text(args.metric or "objective", args.mode, args.method, args.max_forgetting)
    paths = export(best, tc, out, sweep=sweep_dir.name, sweep_dir=sweep_dir, metric=metric, rule=rule)
    forgetting = best.final.get("forgetting")
    shown = f"  forgetting={forgetting:+.3f}" if isinstance(forgetting, (int, float)) else ""
    print(f"best trial {best.trial_id}: {tc.method} lr={tc.learning_rate:.3g} bs={tc.batch_size} "
          f"epochs={tc.epochs}  {metric}={best.objective:.4f}{shown}")
    print(f"chosen by:  {rule}")
    for p in paths:
        print(f"  wrote {p}")
    print(f"train it:  python -m trainer.train {out / 'best.yaml'}")
    if args.max_forgetting is None:
        warning = forgetting_warning(best, records, mode=args.mode, method=args.method, sweep=args.sweep)
        if warning:
            print(warning, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
