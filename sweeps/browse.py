"""What a person opens after a sweep: links into the MLflow UI that land on the trials, and the parent run's note.

MLflow's UI keeps its state in the URL fragment (MLflow 3.17's routes, read from its own bundle):

- ``#/metric?runs=[...]&metric="train_loss"&plot_metric_keys=[...]&x_axis=step``: one metric of many runs,
  overlaid: every trial's training loss against examples seen (the step we log), in one click;
- ``#/compare-runs?runs=[...]&experiments=[...]``: parallel coordinates of the params against a metric,
  scatter and contour plots, and the params and metrics side by side;
- ``#/experiments/ID/runs/PARENT``: the sweep's parent run: its note (the findings), child runs, the report.

The experiment page's table always folds child runs under their parent (a filter that matches only the children
still fetches and nests them), so no link lands on an unfolded table; the compare page lists every trial instead.

MLflow stores chart layouts in the browser (local storage), not on a run or an experiment, so a sweep cannot
set the first chart of the experiment page; the links above open on the curves instead.
"""
from __future__ import annotations

import json
from urllib.parse import quote

DEFAULT_UI = "http://127.0.0.1:5000"  # where `bash mlflow/serve` listens
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
              f"&plot_metric_keys={_q(['train_loss'])}&plot_layout={_q({})}&x_axis=step&y_axis_scale=linear"
              f"&line_smoothness=0&show_point=true&deselected_curves={_q([])}&last_linear_y_axis_range={_q([])}")
    links = {
        "curves": curves,
        "compare": f"{base}/#/compare-runs?runs={runs}&experiments={exps}",
        "sweep": f"{base}/#/experiments/{experiment_id}/runs/{parent_run}?",
    }
    # MLflow 3 has a GenAI and a model-training mode; the URL chooses it, over the browser's last choice
    return {k: v + ("&" if "?" in v and not v.endswith("?") else "") + _TRAINING for k, v in links.items()}


LINK_WORDS = {
    "curves": "train loss of every trial, overlaid",
    "compare": "parallel coordinates: method, lr, batch size, epochs against eval loss",
    "sweep": "the sweep's parent run: findings, map and report",
}


def parent_note(name: str, findings: list[str], figures: list[str], links: dict[str, str], best: str | None) -> str:
    """The parent run's description (MLflow's run note, Markdown): what happened, in words, and where to look."""
    lines = [f"### Sweep `{name}`", ""]
    if best:
        lines += [f"**Best:** {best}", ""]
    lines += ["**Findings**", ""] + [f"- {f}" for f in findings] + [""]
    lines += ["**Figures** (artifacts, folder `report/`): " + ", ".join(f"`{f}`" for f in figures), ""]
    if links:
        lines += ["**Open**", ""] + [f"- [{LINK_WORDS.get(k, k)}]({url})" for k, url in links.items()]
    return "\n".join(lines)
