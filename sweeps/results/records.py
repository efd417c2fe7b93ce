"""The typed record of one finished (or stopped) trial: what the report, the map and export read.

A sweep writes ``SWEEP_DIR/trials.json``: a JSON list of ``TrialRecord.to_json()``.

This module owns the trial record's vocabulary: the metric names a trial reports (and which of
them are logged, kept as curves, read back from MLflow), how a trial ended (``Status``) and what
it was (``Outcome``), and the plain files a sweep folder keeps (``stops.jsonl``, a trial's
``error.txt``). It imports neither Ray, Optuna, MLflow nor torch: reading a sweep needs none.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sweeps.faults import HOST_OOM, TrialStalled, atomic_write, is_host_oom

# --- metric names: the one list, and the named subsets its readers and writers use --------------------------
CURVES = ("train_loss", "train_loss_ema", "eval_loss", "grad_norm", "lr", "tokens_per_s", "objective",
          "train_exact_match", "forgetting")
"""A value at (nearly) every report: the curves MLflow draws and ``sweeps.results.mlflow_records`` reads back. Exact match of
the training completions and forgetting are measured at the end, and along the run with ``exact_match_every``."""
PROGRESS = ("step", "examples_seen", "epoch")
"""Where on the run a report is; ``examples_seen`` is every curve's x axis (MLflow's step)."""
TIMINGS = ("train_time_s", "eval_time_s", "setup_time_s")
MEMORY = ("peak_mem_gib", "mem_estimate_gib", "gpu_share", "mem_cap_gib")
"""Peak memory (CUDA allocated on a GPU, the process's peak resident set on a CPU); on a GPU, the trial's estimate,
its share of the GPU and the CUDA memory cap that share set (``sweeps.launch.placement``)."""
SUMMARY = (
    "l0", "eval_exact_match", "train_token_accuracy", "eval_token_accuracy", "base_train_exact_match",
    "train_completion_loss", "train_prompt_loss", "eval_prompt_loss", "reference_nll", "weight_change_mean",
    "weights_changed_fraction", "trainable_fraction", "train_records", "eval_records", "prompt_tokens",
    "completion_tokens",
)
"""Measured once, at the start (``l0``) or the end of a run."""
METRICS = (*PROGRESS, *CURVES, *TIMINGS, *MEMORY, *SUMMARY)
"""Every numeric metric a trial reports."""
LOGGED_METRICS = tuple(m for m in METRICS if m != "step")
"""What the driver logs to MLflow, each at step = examples_seen (so ``step`` itself is not)."""
HISTORY_KEYS = (*PROGRESS, *CURVES, "train_time_s", "eval_time_s")
"""What a record's ``history`` keeps of each report (setup happens once; the summary is in ``final``)."""


class Status(StrEnum):
    """How a trial ended, as the sweep saw it: the trainer's own last status (completed, diverged or failed),
    or the sweep's stop (pruned, or diverged by the divergence rules). The MLflow ``outcome`` tag."""

    COMPLETED = "completed"
    PRUNED = "pruned"
    DIVERGED = "diverged"
    FAILED = "failed"


class Outcome(StrEnum):
    """What happened to a trial (``sweeps.results.classify``). Stored in records as the plain string value."""

    CONVERGED = "converged"
    SLOW = "slow"
    OSCILLATING = "oscillating"
    OVERFIT = "overfit"
    DIVERGED = "diverged"
    PRUNED = "pruned"
    FAILED = "failed"
    UNFINISHED = "unfinished"


OUTCOMES = tuple(o.value for o in Outcome)
RESTARTED = "restarted.json"
"""In a trial folder: the trial was started again, from its beginning, as another trial (that file names it)."""
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
    """One of OUTCOMES, set by sweeps.results.classify."""
    evidence: str | None = None
    """Why that outcome, in words with the numbers (e.g. 'smoothed loss 4.6x its minimum at 320 examples')."""
    objective: float | None = None
    """The finite objective told to Optuna (or that would have been): min(eval loss, l0) for diverged trials."""
    refine: int | None = None
    """The refinement round that proposed this trial (sweeps.launch.refine); None for a trial of the grid."""

    @property
    def method(self) -> str:
        return self.config.get("method", "?")

    @property
    def learning_rate(self) -> float:
        return float(self.config.get("learning_rate", float("nan")))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialRecord:
        return cls(**data)


def save_records(records: list[TrialRecord], path: Path) -> None:
    atomic_write(path, json.dumps([r.to_json() for r in records], indent=1, allow_nan=False))


def read_trials(path: Path) -> list[TrialRecord]:
    return [TrialRecord.from_json(d) for d in json.loads(path.read_text())]


# --- the plain files of a sweep folder ------------------------------------------------------------------------
def read_stops(path: Path) -> dict[str, str]:
    """trial_id -> the reason the sweep stopped it (the last one recorded in ``stops.jsonl``)."""
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["trial_id"]] = row["reason"]
    return out


_STALLED = re.compile(rf"^(?:[\w.]+\.)?{TrialStalled.__name__}: ")


# an environment variable whose value is never written into a file, a tag or a log
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|CREDENTIAL|AUTH", re.I)


def scrub(value: Any) -> Any:
    """Replace any environment secret (a *TOKEN*, *SECRET*, *KEY* variable's value) inside ``value``."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        for name, secret in os.environ.items():
            if _SECRET_NAME.search(name) and len(secret) >= 8 and secret in value:
                value = value.replace(secret, "***")
    return value


def error_lines(path: str | Path | None) -> list[str]:
    """One line per failure recorded in a trial's error.txt (Ray appends each, retried or not), oldest first.

    A line is the failure's last line, not its traceback; a stall is its bare reason.
    """
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        return []
    blocks = [b for b in re.split(r"^Failure # \d+ .*$", text, flags=re.M) if b.strip()]
    # a worker Ray's memory monitor killed: its error is a page of memory figures; the reason is that one line
    failures = [HOST_OOM if is_host_oom(b) else [ln for ln in b.splitlines() if ln.strip()][-1].strip()[:300]
                for b in blocks]
    return [_STALLED.sub("", line) for line in failures]


def trial_outcome(last: dict, stop_reason: str | None, error: str | None) -> tuple[Status, str]:
    """How the trial ended, with the reason in words, from its last report, the sweep's stop and its failure."""
    if error:
        return Status.FAILED, error
    if last.get("status") == Status.FAILED:
        return Status.FAILED, last.get("reason") or "failed"
    if stop_reason:
        return (Status.DIVERGED if stop_reason.startswith("diverged") else Status.PRUNED), stop_reason
    if last.get("status") == Status.DIVERGED:
        return Status.DIVERGED, f"diverged: {last.get('reason', '')}"
    return Status.COMPLETED, ""
