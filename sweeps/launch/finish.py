"""The end of a sweep: classify every curve, write trials.json, print the summary, draw the map, log it all."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from sweeps.results.analysis import final_loss
from sweeps.results.browse import FINDINGS_FILE, LINK_WORDS, parent_note, ui_base, ui_links
from sweeps.results.classify import classify_all
from sweeps.results.collect import trial_results
from sweeps.results.html_report import build_report
from sweeps.results.records import OUTCOMES, TrialRecord, save_records
from sweeps.results.tradeoff import best_record, finished, front, is_number, non_dominated, points
from sweeps.spec import SweepSpec


def finish_sweep(spec: SweepSpec, sweep_dir: Path, records: list[TrialRecord], tracker, parent: str | None, *,
                 wall_s: float) -> int:
    """Classify, record, report and log the sweep; returns how many MLflow operations could still not be written."""
    classify_all(records, spec.thresholds())
    save_records(records, sweep_dir / "trials.json")
    tracker.flush()  # what was queued (a parent run a new store could not take at the start) is retried first
    parent = parent or tracker.state.get("parent")
    parent_coming = parent or any(op["op"] == "parent" for op in tracker.pending)
    tracker.catch_up(spec.name, records, trial_results(sweep_dir))
    on_front = pareto_ids(records, spec)
    for r in records:
        if r.outcome:
            tags = {"classification": r.outcome, "evidence": r.evidence or ""}
            if finished(r):  # MLflow: filter tags.pareto = 'true' for the trials no other trial beats on every objective
                tags["pareto"] = str(r.trial_id in on_front).lower()
            tracker.submit({"op": "tags", "trial": r.trial_id, "tags": tags})
    print()
    print(summary_table(records, spec.search.metrics[0]))
    links = _links(tracker, parent, records)
    report = build_report(records, sweep_dir / "report", title=f"sweep {spec.name}", links=links)
    print("\nfindings:")
    for line in report.findings:
        print(f"  - {line}")
    best = best_record(records, spec.search.modes[0])
    best_words = None
    if best is not None:
        c = best.config
        best_words = (f"{best.trial_id} {c.get('method')} lr={c.get('learning_rate', float('nan')):.3g} "
                      f"bs={c.get('batch_size', '-')}  {spec.search.metrics[0]}={best.objective:.4f}")
    if parent_coming:
        log_parent_run(tracker, spec.name, report, records, links, best_words, best, spec.search.metrics[0],
                       extra=[sweep_dir / "trials.json"], wall_s=wall_s)
    if best_words:
        print(f"\nbest: {best_words}")
        print(f"export it:  finetune export {sweep_dir}")
        if on_front:
            print(f"the front:  finetune export {sweep_dir} --pareto   ({len(on_front)} trials; "
                  "tag pareto=true in MLflow)")
    print(f"report:     {report.html}")
    left = tracker.flush()
    print(f"browse:     {ui_command(tracker.uri)}")
    for name, url in links.items():
        print(f"  {LINK_WORDS[name]}:\n    {url}")
    print(f"wall time:  {wall_s:.0f} s for {len(records)} trials")
    return left


def log_parent_run(tracker, name: str, report, records: list[TrialRecord], links: dict[str, str], best_words: str | None,
                   best: TrialRecord | None, metric: str, *, extra: list[Path], wall_s: float) -> None:
    """The parent run's artifacts (figures, report, the full findings), its note (a summary within MLflow's limit that
    links the full findings), its tags and summary metrics; then it is ended."""
    for path in [*report.figures, report.html, *extra]:
        tracker.submit({"op": "artifact", "trial": None, "path": str(path), "dest": "report"})
    tracker.submit({"op": "text", "trial": None, "text": "\n".join(report.findings), "file": FINDINGS_FILE})
    if report.importances:
        tracker.submit({"op": "text", "trial": None, "text": json.dumps(report.importances, indent=1),
                        "file": "report/importance.json"})
    note = parent_note(name, report.findings, [p.name for p in [*report.figures, report.html]], links, best_words,
                       summary=outcome_counts(records))
    tracker.submit({"op": "tags", "trial": None, "tags": {"wall_s": f"{wall_s:.1f}", "trials": str(len(records)),
                                                           "mlflow.note.content": note}})
    tracker.submit({"op": "metrics", "trial": None, "last_step": 0,
                    "metrics": [(k, v, int(time.time() * 1000), 0)
                                for k, v in summary_metrics(records, best, metric).items()]})
    tracker.submit({"op": "end", "trial": None, "status": "FINISHED"})  # --resume sets it running again


def outcome_counts(records: list[TrialRecord]) -> str:
    """'42: 26 converged, 8 diverged, ...': the trials per outcome, in the outcomes' order."""
    counts = [(o, sum(r.outcome == o for r in records)) for o in OUTCOMES]
    return f"{len(records)}: " + ", ".join(f"{n} {o}" for o, n in counts if n)


def summary_metrics(records: list[TrialRecord], best: TrialRecord | None, metric: str) -> dict[str, float]:
    """The parent run's own metrics, so its row alone says what happened: the best value and trials per outcome."""
    out: dict[str, float] = {"trials": float(len(records))}
    if best is not None and best.objective is not None:
        out[f"best_{metric}"] = float(best.objective)
    for outcome in OUTCOMES:
        out[f"trials_{outcome}"] = float(sum(r.outcome == outcome for r in records))
    return out


def _links(tracker, parent: str | None, records: list[TrialRecord]) -> dict[str, str]:
    """The UI links of this sweep; none when MLflow cannot be reached (the sweep still reports)."""
    runs = [r.mlflow_run_id or tracker.state["runs"].get(r.trial_id) for r in records]
    if not parent or not all(runs):
        return {}
    try:
        experiment = tracker.experiment_id()
    except Exception:  # a tracking server that went away: no links, the rest of the report stands
        return {}
    return ui_links(ui_base(tracker.uri), experiment, parent, runs)


def pareto_ids(records: list[TrialRecord], spec: SweepSpec) -> set[str]:
    """The trials on the front of the search's objectives (several metrics), else of held-out loss and forgetting."""
    if not spec.search.multi_objective:
        return {p.record.trial_id for p in front(points(records))}
    signs = [1.0 if mode == "min" else -1.0 for mode in spec.search.modes]

    def key(r: TrialRecord) -> tuple[float, ...]:
        return tuple(s * float(r.final[m]) for s, m in zip(signs, spec.search.metrics))

    measured = [r for r in records if finished(r) and all(is_number(r.final.get(m)) for m in spec.search.metrics)]
    return {r.trial_id for r in non_dominated(measured, key)}


def ui_command(uri: str) -> str:
    if uri.startswith("http"):
        return f"open {uri} in a browser"
    serve = Path(__file__).resolve().parents[2] / "mlflow" / "serve"
    try:  # a sweep run from the user's own folder still gets a command that works there
        serve = serve.relative_to(Path.cwd())
    except ValueError:
        pass
    return f"bash {serve} {uri}    (then open http://127.0.0.1:5000)"


def summary_table(records: list[TrialRecord], metric: str) -> str:
    head = f"{'trial':<14}{'method':<12}{'lr':>9}{'bs':>4}{'epochs':>7}  {'outcome':<12}{metric:>10}{'steps':>7}  evidence"
    lines = [head, "-" * len(head)]
    for r in sorted(records, key=lambda r: (r.method, r.learning_rate, r.config.get("batch_size", 0))):
        c = r.config
        loss = final_loss(r)
        value = f"{loss:.4f}" if loss is not None and math.isfinite(loss) else "-"
        steps = r.history[-1].get("step", "-") if r.history else "-"
        lines.append(
            f"{r.trial_id:<14}{r.method:<12}{c.get('learning_rate', float('nan')):>9.2g}{c.get('batch_size', '-'):>4}"
            f"{str(c.get('epochs', '-')):>7}  {r.outcome or '?':<12}{value:>10}{steps:>7}  {(r.evidence or '')[:70]}"
        )
    return "\n".join(lines)
