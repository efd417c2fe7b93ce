"""Fine-tune once, for production or to reproduce a sweep trial.

    python -m trainer.train CONFIG.yaml [key=value ...]
    python -m trainer.train CONFIG.yaml method=lora learning_rate=3e-4 output_dir=runs/lora

CONFIG.yaml holds TrainConfig fields (see trainer/config.py); ``best.yaml`` from
``finetune export`` writes such a file. Exit code 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys

from trainer.errors import cli_errors, prog_name


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog_name("python -m trainer.train"), description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML file of TrainConfig fields")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, checked against the schema")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from trainer.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    if cfg.output_dir is None:
        cfg = cfg.model_copy(update={"output_dir": "runs/latest"})
    from trainer.loop import train
    from trainer.quiet import quiet_libraries

    quiet_libraries()
    _check_data_early(cfg)
    _check_method_early(cfg, args.config)
    result = train(cfg, progress=not args.no_progress)
    m = result.metrics
    print(f"status: {result.status}{' (' + result.reason + ')' if result.reason else ''}")
    print(f"eval loss: {m['l0']:.4f} (base) -> {m['eval_loss']:.4f}")
    if "eval_exact_match" in m:
        print(f"exact match train: {m['base_train_exact_match']:.0%} -> {m['train_exact_match']:.0%}; "
              f"held-out: {m['base_eval_exact_match']:.0%} -> {m['eval_exact_match']:.0%}")
    if "forgetting" in m:
        print(f"forgetting (reference NLL change): {m['forgetting']:+.4f} nats")
    if "weights_changed_fraction" in m:
        print(f"weights changed: {m['weights_changed_fraction']:.1%} of parameters, "
              f"mean relative change {m['weight_change_mean']:.2e}")
    print(f"trainable: {m['trainable_params']:,} parameters ({m['trainable_fraction']:.2%})")
    print(f"outputs: {result.output_dir}")
    return 0 if result.status == "completed" else 1


def _check_data_early(cfg) -> None:
    """Read the data files before loading a model, so bad data fails in a second, not after a load."""
    from trainer.config import eval_size_warning
    from trainer.data import read_examples, split_records

    _, held_out = split_records(read_examples(cfg.train_data), cfg.eval_data, cfg.eval_fraction)
    print(f"{cfg.eval_plan()} ({len(held_out)} records)", flush=True)
    if eval_size_warning(len(held_out)):
        print(eval_size_warning(len(held_out)), flush=True)


def _check_method_early(cfg, config_file: str) -> None:
    """Refuse a model the method cannot tune (read from its config, no weights) before it is loaded."""
    from trainer.errors import UserError
    from trainer.methods import check_method_supports
    from trainer.models import resolve_model_dir

    try:
        check_method_supports(cfg.method, resolve_model_dir(cfg.model), model_label=cfg.model,
                              trust_remote_code=cfg.trust_remote_code)
    except UserError as exc:
        raise UserError(f"{config_file}: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
