"""Run a fine-tuning sweep.

    python sweeps/run.py search_spaces/lr.yaml
    python sweeps/run.py search_spaces/lr.yaml search.n_trials=8 train.epochs=1
    python sweeps/run.py search_spaces/smoke.yaml --dry-run
    python sweeps/run.py search_spaces/lr.yaml --resume
    python sweeps/run.py search_spaces/lr.yaml --time-budget 600         # stop after 10 min; --resume continues
    python sweeps/run.py search_spaces/lr.yaml --address 10.0.0.5:6379     # join a Ray cluster

Ray Tune schedules the trials, Optuna samples and prunes, MLflow records every
loss curve; at the end each curve is classified and the instability map drawn.
Bad input exits with code 2 and one message naming the file and key; a sweep that could not finish what it
had to write (a full disk, a store it cannot write, MLflow operations still queued) exits with code 3 and one
line that says what, and how to continue it (--resume).
"""
from __future__ import annotations

import argparse
import os
import sys

from trainer.errors import cli_errors, prog_name

# The sweep's modules are imported after the arguments are read, so --help and bad input answer without Ray, torch
# or MLflow, and --dry-run loads only what it plans with.


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog_name("python sweeps/run.py"), description="Run a fine-tuning sweep.")
    parser.add_argument("spec", help="sweep spec (YAML), e.g. search_spaces/lr.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, checked against the schema")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    parser.add_argument("--address", help="join this Ray cluster (default: $RAY_ADDRESS, else a fresh local Ray)")
    parser.add_argument("--time-budget", metavar="SECONDS",
                        help="stop the trials SECONDS after they start (as search.time_budget_s=SECONDS); --resume continues")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the trials or the space, run nothing")
    args = parser.parse_intermixed_args(argv)

    from sweeps.spec import load_spec

    # Checked by the schema like any override, so a bad value gets the same message and exit code 2.
    budget = [f"search.time_budget_s={args.time_budget}"] if args.time_budget is not None else []
    spec = load_spec(args.spec, args.overrides + budget)
    from trainer.quiet import quiet_libraries

    quiet_libraries()
    if args.dry_run:
        from sweeps.launch.space import describe
        from trainer.config import eval_size_warning
        from trainer.data import run_records

        print(describe(spec))
        train, held_out = run_records(spec.base)
        print(f"{spec.base.eval_plan()}: {len(held_out)} eval records, {len(train)} training records")
        if eval_size_warning(len(held_out)):
            print(eval_size_warning(len(held_out)))
        _print_plan(spec, args.address)
        print(f"sweep folder: {spec.sweep_dir()}")
        return 0
    from sweeps.faults import stopped_cleanly
    from sweeps.launch.sweep import run_sweep

    with stopped_cleanly(f"python sweeps/run.py {spec.source or args.spec} --resume", folder=spec.sweep_dir()):
        run_sweep(spec, resume=args.resume, address=args.address)
    return 0


def _print_plan(spec, address: str | None) -> None:
    """The packing plan: on this machine (no Ray started), or on the cluster at --address / $RAY_ADDRESS."""

    from sweeps.launch.placement import ignored_gpus_warning, local_nodes, plan_lines, ray_nodes

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        from sweeps.launch.sweep import _init_ray

        _init_ray(spec, address)
        nodes = ray_nodes()
    else:
        nodes = local_nodes()
    for line in [*plan_lines(spec, nodes), ignored_gpus_warning(spec, nodes)]:
        if line:
            print(line)


if __name__ == "__main__":
    sys.exit(main())
