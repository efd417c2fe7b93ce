"""The instability map of a finished sweep, on demand.

    python sweeps/report.py SWEEP          # SWEEP: the sweep folder, or its MLflow experiment name
    python sweeps/report.py sweeps_out/lr-instability --out /tmp/report

Writes PNG figures (map, loss curves, per-method panel, what fine-tuning
changed) and one self-contained HTML file, and prints the diagnosis.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import cli_errors, prog_name


@dataclass
class Report:
    figures: list[Path]
    html: Path
    findings: list[str]
    importances: dict[str, dict[str, float]] = field(default_factory=dict)
    """objective -> {searched setting: fANOVA importance}; empty with too few finished trials."""


def build_report(records, out_dir: Path, *, title: str, links: dict[str, str] | None = None) -> Report:
    """Draw every figure and the HTML report for classified records; never fails on missing data."""
    import matplotlib

    matplotlib.use("Agg")
    from sweeps import figures, importance, questions, tradeoff
    from sweeps.analysis import diagnose, small_heldout
    from sweeps.html_report import write_html

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    found = importance.importances(records)
    found_first = diagnose(records)
    warned = len(small_heldout(records))  # the warnings first, then the answers to a question the sweep asks
    findings = (found_first[:warned] + questions.findings(records) + found_first[warned:] + tradeoff.findings(records)
                + importance.findings(records, found))
    paths = [
        figures.map_figure(records, out_dir / "map.png"),
        figures.curves_figure(records, out_dir / "curves.png"),
        figures.method_panel_figure(records, out_dir / "methods.png"),
        figures.changes_figure(records, out_dir / "changes.png"),
        figures.tradeoff_figure(records, out_dir / "tradeoff.png"),
        figures.importance_figure(found, out_dir / "importance.png",
                                  note=f"parameter importance needs >= {importance.MIN_TRIALS} finished trials"),
    ]
    html = out_dir / "report.html"
    write_html(records, paths, findings, html, title, links=links)
    return Report(paths, html, findings, found)


def load_sweep(target: str):
    """Records of a sweep folder (trials.json, or the raw trial folders) or of an MLflow experiment name."""
    if Path(target).is_dir():
        from sweeps.collect import load_folder

        return load_folder(target)
    from sweeps.mlflow_records import records_from_experiment

    return records_from_experiment(target)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog_name("python sweeps/report.py"),
                                     description="Draw the instability map of a sweep.")
    parser.add_argument("sweep", help="the sweep folder (e.g. sweeps_out/lr-instability) or its MLflow experiment name")
    parser.add_argument("--out", help="where to write the figures and report.html (default: SWEEP/report)")
    args = parser.parse_args(argv)
    records, where = load_sweep(args.sweep)
    out = Path(args.out) if args.out else Path(where) / "report"
    report = build_report(records, out, title=f"sweep {Path(str(where)).name}")
    for line in report.findings:
        print(f"- {line}")
    print(f"report: {report.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
