"""The typed record of one finished (or stopped) trial: what the report, the map and export read.

A sweep writes ``SWEEP_DIR/trials.json``: a JSON list of ``TrialRecord.to_json()``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class Outcome(str, Enum):
    """What happened to a trial (``sweeps.classify``). Stored in records as the plain string value."""

    CONVERGED = "converged"
    SLOW = "slow"
    OSCILLATING = "oscillating"
    OVERFIT = "overfit"
    DIVERGED = "diverged"
    PRUNED = "pruned"
    FAILED = "failed"
    UNFINISHED = "unfinished"


OUTCOMES = tuple(o.value for o in Outcome)
# Keys of a trial's Ray config that are the search's bookkeeping, not trainer settings: the grid's cell
# index, and the refinement round of a trial that sweeps.refine proposed.
NOT_SETTINGS = ("cell", "refine")
# How each outcome is named in the map's legend, the HTML report and the README table.
LABELS = {
    "converged": "converged",
    "slow": "slow / LR too low",
    "oscillating": "oscillating",
    "overfit": "overfit / mismatch",
    "diverged": "diverged (train loss)",
    "pruned": "pruned",
    "failed": "failed",
    "unfinished": "unfinished",
}


@dataclass
class TrialRecord:
    trial_id: str
    config: dict[str, Any]
    """The trial's TrainConfig fields (method, learning_rate, batch_size, epochs, ...)."""
    params: dict[str, Any] = field(default_factory=dict)
    """The values the search chose for this trial (the spec's ``space`` dimensions it sampled; ``lora_r`` only
    for LoRA trials when the spec says so). Empty in records written before it existed."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One dict per report: step, examples_seen, train_loss, train_loss_ema, grad_norm, lr, tokens_per_s,
    and eval_loss at eval points. Values are floats; non-finite values are stored as None."""
    final: dict[str, Any] = field(default_factory=dict)
    """The last report: l0, eval_loss, status (completed|diverged|failed), reason, and for completed runs
    train/eval exact match, token accuracy, forgetting, weight_change_by_layer (list of
    {layer, rel_change, changed_fraction}), trainable_fraction, ..."""
    stopped_by: str | None = None
    """Why the sweep stopped the trial early: 'diverged: ...' or 'pruned: median at 64 examples'; None if it ran out."""
    error: str | None = None
    """Set when the trial process failed (exception, out of memory)."""
    mlflow_run_id: str | None = None
    outcome: str | None = None
    """One of OUTCOMES, set by sweeps.classify."""
    evidence: str | None = None
    """Why that outcome, in words with the numbers (e.g. 'smoothed loss 4.6x its minimum at 320 examples')."""
    objective: float | None = None
    """The finite objective told to Optuna (or that would have been): min(eval loss, l0) for diverged trials."""
    refine: int | None = None
    """The refinement round that proposed this trial (sweeps.refine); None for a trial of the grid."""

    @property
    def method(self) -> str:
        return self.config.get("method", "?")

    @property
    def learning_rate(self) -> float:
        return float(self.config.get("learning_rate", float("nan")))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrialRecord":
        return cls(**data)


def save_records(records: list[TrialRecord], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([r.to_json() for r in records], indent=1, allow_nan=False))
    tmp.replace(path)


def load_records(path: Path) -> list[TrialRecord]:
    return [TrialRecord.from_json(d) for d in json.loads(path.read_text())]
