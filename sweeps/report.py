"""The instability map of a finished sweep, on demand (``finetune report``).

    finetune report SWEEP          # SWEEP: the sweep folder, or its MLflow experiment name
    finetune report sweeps_out/lr-instability --out /tmp/report
    python sweeps/report.py SWEEP  # the same, from a checkout

Writes PNG figures (map, loss curves, per-method panel, what fine-tuning
changed) and one self-contained HTML file, and prints the diagnosis. The
drawing is ``sweeps.results.html_report.build_report``; this module is the command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.errors import cli_errors, prog_name


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog_name("python sweeps/report.py"),
                                     description="Draw the instability map of a sweep.")
    parser.add_argument("sweep", help="the sweep folder (e.g. sweeps_out/lr-instability) or its MLflow experiment name")
    parser.add_argument("--out", help="where to write the figures and report.html (default: SWEEP/report)")
    args = parser.parse_args(argv)
    # after the arguments: --help answers without loading matplotlib, Optuna (importance) or MLflow
    from sweeps.results.html_report import build_report
    from sweeps.results.mlflow_records import load_sweep

    records, where = load_sweep(args.sweep)
    out = Path(args.out) if args.out else Path(where) / "report"
    report = build_report(records, out, title=f"sweep {Path(str(where)).name}")
    for line in report.findings:
        print(f"- {line}")
    print(f"report: {report.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
