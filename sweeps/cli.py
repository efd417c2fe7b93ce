"""The one command, ``finetune``: a subcommand per job, each the ``main`` of its own module.

    finetune sweep search_spaces/lr.yaml                  # = python sweeps/run.py search_spaces/lr.yaml
    finetune report sweeps_out/lr-instability             # = python sweeps/report.py sweeps_out/lr-instability
    finetune export sweeps_out/lr-instability --method lora
    finetune lr-find search_spaces/lr.yaml
    finetune train sweeps_out/lr-instability/export/best.yaml   # = python -m trainer.train ...
    python -m sweeps.cli --help                           # the same command from a checkout that is not installed

``finetune SUBCOMMAND --help`` shows that command's own arguments. The table below is the whole dispatch: a new
command is one row and a module with ``main(argv) -> int``.
"""
from __future__ import annotations

import argparse
import sys

from trainer.errors import invoked_as


# Each command imports its module when it runs, so `finetune --help` and a report load neither torch nor Ray.
def _sweep(argv: list[str]) -> int:
    from sweeps.run import main

    return main(argv)


def _train(argv: list[str]) -> int:
    from trainer.train import main

    return main(argv)


def _export(argv: list[str]) -> int:
    from sweeps.results.export import main

    return main(argv)


def _report(argv: list[str]) -> int:
    from sweeps.report import main

    return main(argv)


def _lr_find(argv: list[str]) -> int:
    from sweeps.launch.lr_find import main

    return main(argv)


COMMANDS = {  # subcommand -> (its module's main, one line for the help)
    "sweep": (_sweep, "run a sweep of fine-tuning trials from a spec (Ray Tune, Optuna, MLflow)"),
    "train": (_train, "one fine-tuning run from a trainer config (e.g. an export's best.yaml)"),
    "export": (_export, "export a finished sweep's best trial for the production fine-tune"),
    "report": (_report, "draw the instability map and the report of a finished sweep"),
    "lr-find": (_lr_find, "the learning-rate range test: each method's LR bounds before a sweep"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tuning sweeps that map where training is stable.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, words) in COMMANDS.items():
        # add_help=False: `finetune NAME --help` reaches the command's own parser, which knows its arguments
        commands.add_parser(name, help=words, add_help=False)
    args, rest = parser.parse_known_args(argv)
    run, _ = COMMANDS[args.command]
    invoked_as(f"finetune {args.command}")
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
