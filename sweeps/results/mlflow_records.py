"""TrialRecords from an MLflow experiment (or a sweep folder: ``load_sweep``), for ``finetune report`` and export.

If the sweep's folder (the parent run's ``sweep_dir`` tag) is on this machine
it is read directly; otherwise the records are rebuilt from the child runs:
params, metric histories (step = examples_seen) and the outcome tags.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from sweeps.results.classify import classify_all
from sweeps.results.collect import load_folder
from sweeps.results.records import CURVES, Status, TrialRecord
from sweeps.spec import sampled_settings
from trainer.curves import Thresholds
from trainer.errors import UserError
from trainer.yamlio import safe_load

# mlflow is imported in records_from_experiment only: a sweep folder is read without it


def load_sweep(target: str):
    """Records of a sweep folder (trials.json, or the raw trial folders) or of an MLflow experiment name."""
    if Path(target).is_dir():
        return load_folder(target)
    return records_from_experiment(target)


def records_from_experiment(name: str, uri: str | None = None):
    """``(records, folder_or_name)`` for the sweep logged as MLflow experiment ``name``."""
    from mlflow.tracking import MlflowClient

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('sweeps_out').resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise UserError(f"{name}: neither a sweep folder nor an MLflow experiment at {uri}")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get("role") == "sweep"]
    folder = parents[0].data.tags.get("sweep_dir") if parents else None
    if folder and Path(folder).is_dir():
        return load_folder(folder)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    if not children:
        raise UserError(f"{name}: the MLflow experiment has no trial runs")
    records = [_record(client, run) for run in children]
    params = parents[0].data.params if parents else {}
    keys = {"factor": "pruning.divergence.factor", "spike": "pruning.divergence.spike"}
    classify_all(records, Thresholds(**{k: float(params[p]) for k, p in keys.items() if p in params}))
    return records, name


def _record(client, run) -> TrialRecord:
    tags, params = run.data.tags, run.data.params
    config = {k: _parse(v) for k, v in sampled_settings(params).items()}
    by_step: dict[int, dict] = {}
    for key in CURVES:
        for m in client.get_metric_history(run.info.run_id, key):
            by_step.setdefault(m.step, {"examples_seen": m.step})[key] = m.value
    history = [by_step[s] for s in sorted(by_step)]
    final = dict(run.data.metrics)
    outcome = tags.get("outcome", Status.COMPLETED)
    final["status"] = outcome if outcome in (Status.FAILED, Status.DIVERGED) else Status.COMPLETED.value  # pruned ran fine
    final["done"] = outcome == Status.COMPLETED
    reason = tags.get("reason") or None
    return TrialRecord(
        trial_id=tags.get("trial_id", run.info.run_id[:8]), config=config, params=dict(config), history=history, final=final,
        stopped_by=reason if outcome in (Status.PRUNED, Status.DIVERGED) else None,
        error=reason if outcome == Status.FAILED else None, mlflow_run_id=run.info.run_id,
        objective=final.get("objective"), refine=int(tags["refine"]) if tags.get("refine", "").isdigit() else None,
    )


def _parse(value: str):
    try:
        return safe_load(value)
    except yaml.YAMLError:
        return value
