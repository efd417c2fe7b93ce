"""What a person opens after a sweep: links into the MLflow UI that land on the trials, and the parent run's note.

MLflow's UI keeps its state in the URL fragment (MLflow 3.17's routes, read from its own bundle):

- ``#/metric?runs=[...]&metric="train_loss"&plot_metric_keys=[...]&x_axis=step``: one metric of many runs,
  overlaid: every trial's training loss against examples seen (the step we log), in one click;
- ``#/compare-runs?runs=[...]&experiments=[...]``: parallel coordinates of the params against a metric,
  scatter and contour plots, and the params and metrics side by side;
- ``#/experiments/ID/runs/PARENT``: the sweep's parent run: its note (the findings), child runs, the report;
- ``#/experiments/ID/runs/PARENT/artifacts/report/findings.txt``: every finding, in full.

The curves open on a log y-axis: a diverged curve reaches 100 where a converged one ends near 1.

The parent run's note is an MLflow tag, whose value MLflow cuts at ``NOTE_LIMIT`` characters (with a warning among the
sweep's last lines): the note is a summary that fits, and links the full findings.

The experiment page's table always folds child runs under their parent (a filter that matches only the children
still fetches and nests them), so no link lands on an unfolded table; the compare page lists every trial instead.

MLflow stores chart layouts in the browser (local storage), not on a run or an experiment, so a sweep cannot
set the first chart of the experiment page; the links above open on the curves instead.
"""
from __future__ import annotations

import json
from urllib.parse import quote

DEFAULT_UI = "http://127.0.0.1:5000"  # where `bash mlflow/serve` listens
FINDINGS_FILE = "report/findings.txt"  # the full findings, an artifact of the parent run
NOTE_LIMIT = 8000  # MLflow's limit on a tag's value (mlflow.utils.validation.MAX_TAG_VAL_LENGTH); the note is a tag
_TRAINING = "workflowType=machine_learning"


def ui_base(uri: str) -> str:
    """The UI's address: the tracking server itself, or the local UI that `bash mlflow/serve` starts."""
    return uri.rstrip("/") if uri.startswith("http") else DEFAULT_UI


def _q(value) -> str:
    return quote(json.dumps(value, separators=(",", ":")), safe="")


def ui_links(base: str, experiment_id: str, parent_run: str, trial_runs: list[str]) -> dict[str, str]:
    """name -> URL: 'curves' (train loss of every trial overlaid), 'compare' (parallel coordinates), 'sweep'."""
    runs, exps = _q(sorted(trial_runs)), _q([str(experiment_id)])
    curves = (f"{base}/#/metric?runs={runs}&metric={_q('train_loss')}&experiments={exps}"
              f"&plot_metric_keys={_q(['train_loss'])}&plot_layout={_q({})}&x_axis=step&y_axis_scale=log"
              f"&line_smoothness=0&show_point=true&deselected_curves={_q([])}&last_linear_y_axis_range={_q([])}")
    links = {
        "curves": curves,
        "compare": f"{base}/#/compare-runs?runs={runs}&experiments={exps}",
        "sweep": f"{base}/#/experiments/{experiment_id}/runs/{parent_run}?",
        "findings": f"{base}/#/experiments/{experiment_id}/runs/{parent_run}/artifacts/{FINDINGS_FILE}?",
    }
    # MLflow 3 has a GenAI and a model-training mode; the URL chooses it, over the browser's last choice
    return {k: v + ("&" if "?" in v and not v.endswith("?") else "") + _TRAINING for k, v in links.items()}


LINK_WORDS = {
    "curves": "train loss of every trial, overlaid",
    "compare": "parallel coordinates: method, lr, batch size, epochs against eval loss",
    "sweep": "the sweep's parent run: findings, map and report",
    "findings": f"every finding in full ({FINDINGS_FILE} on the parent run)",
}


def parent_note(name: str, findings: list[str], figures: list[str], links: dict[str, str], best: str | None,
                summary: str | None = None, limit: int = NOTE_LIMIT) -> str:
    """The parent run's description (MLflow's run note, Markdown), at most ``limit`` characters: the best trial and the
    trials per outcome first, then as many findings as fit (in their order), the figures and the links; the findings
    left out are counted and the full list linked (``FINDINGS_FILE``)."""
    head = [f"### Sweep `{name}`", ""]
    if best:
        head += [f"**Best:** {best}", ""]
    if summary:
        head += [f"**Trials:** {summary}", ""]
    where = f"[`{FINDINGS_FILE}`]({links['findings']})" if "findings" in links else f"`{FINDINGS_FILE}` (artifacts)"
    head += [f"**Findings** ({len(findings)}; all of them in {where})", ""]
    tail = ["", "**Figures** (artifacts, folder `report/`): " + ", ".join(f"`{f}`" for f in figures), ""]
    opened = ["**Open**", ""] + [f"- [{LINK_WORDS.get(k, k)}]({url})" for k, url in links.items()] if links else []
    if _size(head + tail + opened) > limit // 2:  # many trials make long links: keep room for the findings
        opened = ["**Open**: the links are printed at the end of the sweep and in `report.html`"]
    more = f"- ... {len(findings)} more finding(s) in {where}"  # as long as it can be
    room = limit - _size(head + tail + opened) - len(more) - 1
    shown: list[str] = []
    for finding in findings:
        line = f"- {finding}"
        if _size(shown) + len(line) + 1 > room:
            break
        shown.append(line)
    if len(shown) < len(findings):
        shown.append(f"- ... {len(findings) - len(shown)} more finding(s) in {where}")
    note = "\n".join(head + shown + tail + opened)
    return note if len(note) <= limit else note[: limit - 1] + "…"  # a link longer than the note itself


def _size(lines: list[str]) -> int:
    return sum(len(x) + 1 for x in lines)
