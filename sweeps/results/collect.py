"""Read a sweep folder back into TrialRecords: Ray's per-trial result files, the stop reasons, the MLflow map.

Works on a finished or interrupted sweep, without Ray running.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sweeps.results.classify import classify_all
from sweeps.results.records import (
    HISTORY_KEYS,
    RESTARTED,
    Status,
    TrialRecord,
    error_lines,
    read_stops,
    read_trials,
    trial_outcome,
)
from sweeps.spec import SweepSpec, sampled_settings
from trainer.config import TrainConfig
from trainer.curves import Thresholds
from trainer.errors import UserError
from trainer.outputs import finite


def load_folder(folder: str | Path) -> tuple[list[TrialRecord], Path]:
    """``(records, folder)`` of a sweep folder (its trials.json, else the raw trial folders), classified with the
    current rules and the sweep's own thresholds; what the report, the export and an MLflow experiment
    whose sweep folder is on this machine read."""
    path = Path(folder)
    records = read_trials(path / "trials.json") if (path / "trials.json").is_file() else collect_records(path)
    if not records:
        raise UserError(f"{folder}: no trials found in this folder")
    classify_all(records, sweep_thresholds(path))
    return records, path


def sweep_thresholds(sweep_dir: Path):
    """The curve thresholds of the sweep's own spec (its spec.json); the defaults without one."""
    divergence = _json(Path(sweep_dir) / "spec.json").get("spec", {}).get("pruning", {}).get("divergence", {})
    return Thresholds(**{k: float(divergence[k]) for k in ("factor", "spike") if k in divergence})


def collect_records(sweep_dir: Path) -> list[TrialRecord]:
    sweep_dir = Path(sweep_dir)
    stops = read_stops(sweep_dir / "stops.jsonl")
    mlflow_map = _json(sweep_dir / "mlflow.json").get("runs", {})
    base = _base_config(sweep_dir)
    records = []
    for trial_dir in trial_dirs(sweep_dir):
        record = _record(trial_dir, stops, mlflow_map, base)
        if record is not None:
            records.append(record)
    return sorted(records, key=lambda r: r.trial_id)


def trial_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's trial folders; not one a resume restarted under another trial id (``RESTARTED``)."""
    return sorted(p for p in Path(sweep_dir).iterdir()
                  if p.is_dir() and (p / "params.json").is_file() and not (p / RESTARTED).exists())


def trial_results(sweep_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """trial id -> its reports, oldest first, as its result.json holds them."""
    out = {}
    for trial_dir in trial_dirs(sweep_dir):
        lines = _results(trial_dir / "result.json")
        if lines and lines[-1].get("trial_id"):
            out[lines[-1]["trial_id"]] = lines
    return out


def _base_config(sweep_dir: Path) -> dict[str, Any]:
    """The fixed trainer fields of the sweep (from spec.json), so each record holds its full config."""
    saved = _json(sweep_dir / "spec.json").get("spec")
    if not saved:
        return {}
    return SweepSpec.model_validate(saved).base_train()


def _record(trial_dir: Path, stops: dict, mlflow_map: dict, base: dict) -> TrialRecord | None:
    params = _json(trial_dir / "params.json")
    sampled = sampled_settings(params)
    config = _resolved({**base, **sampled})
    lines = _results(trial_dir / "result.json")
    trial_id = lines[-1].get("trial_id") if lines else _trial_id_from_name(trial_dir.name)
    if not trial_id:
        return None
    results = [r for r in lines if "stalled" not in r]  # the watchdog's last word is no point of the curve
    history = _dedupe([{k: finite(r.get(k)) for k in HISTORY_KEYS if k in r} for r in results])
    final = {k: v for k, v in (results[-1] if results else {}).items() if not k.startswith(("time_", "timestamp", "config"))}
    failures = error_lines(trial_dir / "error.txt")
    if failures:
        final["failures"] = failures  # every failure, oldest first: each but a final one was retried
    # error.txt stays behind when a retry succeeded: the last report then says how the trial really ended
    recovered = final.get("done") and final.get("status") in (Status.COMPLETED, Status.DIVERGED)
    error = None if recovered or not failures else failures[-1]
    outcome, reason = trial_outcome(final, stops.get(trial_id), error)
    record = TrialRecord(
        trial_id=trial_id, config=config, params=sampled, history=history, final=finite(final),
        stopped_by=stops.get(trial_id), error=(error or reason) if outcome == Status.FAILED else None,
        mlflow_run_id=mlflow_map.get(trial_id), refine=params.get("refine"),
    )
    record.objective = _objective(final, outcome)
    return record


def _resolved(config: dict[str, Any]) -> dict[str, Any]:
    """Every TrainConfig field, defaults included: a sweep that does not vary learning_rate still has one."""
    try:
        return {**config, **TrainConfig.model_validate(config).model_dump(mode="json")}
    except ValidationError:  # a record of an older or hand-edited sweep: keep what is there
        return config


def _objective(final: dict, outcome: str) -> float | None:
    value = final.get("objective")
    if outcome == Status.FAILED or value is None or not math.isfinite(value):
        return None
    l0 = final.get("l0")
    return min(value, l0) if outcome == Status.DIVERGED and l0 is not None else value


def _results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut short by a kill
    return out


def _dedupe(history: list[dict]) -> list[dict]:
    """One row per examples_seen, later values winning.

    A retried trial re-reports from its checkpoint; and a trainer that stops right after a report
    sends its final report at the same examples_seen, which must not erase that report's values.
    """
    by_step: dict[Any, dict] = {}
    for row in history:
        key = row.get("examples_seen")
        by_step[key] = {**by_step.get(key, {}), **row}
    return sorted(by_step.values(), key=lambda r: r.get("examples_seen") or 0)


# <trainable>_<trial id>_<index>_<config>_<date>; Ray's ids: 8 hex digits (Trial.generate_id, a searcher's trials)
# or 5 hex digits, "_" and a 5-digit count (BasicVariantGenerator)
_TRIAL_DIR = re.compile(r"^run_trial_([0-9a-f]{5}_\d{5}|[0-9a-f]{8})_\d+_")


def _trial_id_from_name(name: str) -> str | None:
    """The trial id of a trial that never reported (stopped while it loaded its model)."""
    match = _TRIAL_DIR.match(name)
    return match.group(1) if match else None


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
