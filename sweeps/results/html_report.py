"""A finished sweep's report: every figure, the findings, and one self-contained HTML file that opens offline.

``build_report`` is what the report command (``finetune report``) and the end of a sweep (``sweeps.launch.finish``)
both call; a new figure is drawn in ``figures.py`` and added to its list here.
"""
from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from sweeps.results import figures, importance, questions, tradeoff
from sweeps.results.analysis import diagnose, final_loss, small_heldout
from sweeps.results.browse import LINK_WORDS
from sweeps.results.figures import OUTCOME_COLORS
from sweeps.results.records import LABELS
from sweeps.results.tradeoff import front, label, points, ppl_factor, varied_keys

_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1400px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}img{max-width:100%;border:1px solid #eee}
table{border-collapse:collapse;font-size:12px}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
th{background:#f6f6f6}.o{color:#fff;padding:1px 6px;border-radius:3px}li{margin:3px 0}"""



@dataclass
class Report:
    figures: list[Path]
    html: Path
    findings: list[str]
    importances: dict[str, dict[str, float]] = field(default_factory=dict)
    """objective -> {searched setting: fANOVA importance}; empty with too few finished trials."""


def build_report(records, out_dir: Path, *, title: str, links: dict[str, str] | None = None) -> Report:
    """Draw every figure and the HTML report for classified records; never fails on missing data."""
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
    html_file = out_dir / "report.html"
    write_html(records, paths, findings, html_file, title, links=links)
    return Report(paths, html_file, findings, found)


def write_html(records, figures: list[Path], findings: list[str], out: Path, title: str,
               links: dict[str, str] | None = None) -> Path:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if links:  # into the MLflow UI (served by `bash mlflow/serve` for a local store)
        anchors = [f"<a href='{html.escape(url, quote=True)}'>{html.escape(LINK_WORDS.get(k, k))}</a>"
                   for k, url in links.items()]
        parts.append("<p>Open in MLflow: " + " &middot; ".join(anchors) + "</p>")
    parts.append("<h2>Diagnosis</h2><ul>")
    parts += [f"<li>{html.escape(f)}</li>" for f in findings] + ["</ul>"]
    parts.append("<p>" + " ".join(f"<span class='o' style='background:{c}'>{html.escape(LABELS[o])}</span>"
                                  for o, c in OUTCOME_COLORS.items()) + "</p>")
    for fig in figures:
        data = base64.b64encode(Path(fig).read_bytes()).decode()
        parts.append(f"<h2>{html.escape(Path(fig).stem)}</h2><img alt='{Path(fig).stem}' src='data:image/png;base64,{data}'>")
    parts.extend(_front_table(records))
    parts.append("<h2>Trials</h2><table><tr><th>trial</th><th>method</th><th>lr</th><th>batch size</th><th>epochs</th>"
                 "<th>outcome</th><th>evidence</th><th>final eval loss</th><th>l0</th><th>steps</th></tr>")
    for r in sorted(records, key=lambda r: (r.method, r.learning_rate)):
        loss, l0 = final_loss(r), r.final.get("l0")
        color = OUTCOME_COLORS.get(r.outcome, "#999")
        steps = r.history[-1].get("step", "") if r.history else ""
        parts.append(
            f"<tr><td>{html.escape(r.trial_id)}</td><td>{html.escape(r.method)}</td><td>{r.learning_rate:.2g}</td>"
            f"<td>{r.config.get('batch_size', '')}</td><td>{r.config.get('epochs', '')}</td>"
            f"<td><span class='o' style='background:{color}'>{html.escape(r.outcome or '?')}</span></td>"
            f"<td>{html.escape(r.evidence or '')}</td><td>{_num(loss)}</td><td>{_num(l0)}</td><td>{steps}</td></tr>")
    parts.append("</table></body></html>")
    out = Path(out)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _front_table(records) -> list[str]:
    """The trade-off front: the trials no other trial beats on both held-out loss and forgetting."""
    pts = front(points(records))
    if not pts:
        return []
    keys = varied_keys(records)
    rows = ["<h2>Trade-off front (held-out loss against forgetting)</h2><table><tr><th>trial</th><th>settings</th>"
            "<th>held-out loss</th><th>forgetting (nats)</th><th>reference perplexity x base</th></tr>"]
    rows += [f"<tr><td>{html.escape(p.record.trial_id)}</td><td>{html.escape(label(p.record, keys))}</td>"
             f"<td>{p.loss:.4f}</td><td>{p.forgetting:+.3f}</td><td>{ppl_factor(p.forgetting):.2f}x</td></tr>" for p in pts]
    return rows + ["</table>"]
