"""The sweep spec: YAML validated once, at the boundary, into typed objects.

    spec = load_spec("search_spaces/lr.yaml", overrides=["search.n_trials=8"])

Unknown keys are errors; every problem is reported at once, naming the file,
the key path and the bad value (exit code 2 through the CLI). Relative data
paths are resolved against the spec's folder. No raw dict travels further:
trials get ``TrainConfig`` objects built from ``spec.train`` plus the sampled
values (see ``sweeps.launch.space``).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.config import TrainConfig
from trainer.curves import Thresholds
from trainer.errors import UserError
from trainer.methods import METHODS
from trainer.yamlio import apply_overrides, read_yaml, validation_message

# Keys of a trial's Ray config that are the search's bookkeeping, not trainer settings: the grid's cell
# index, and the refinement round of a trial that sweeps.launch.refine proposed.
# ``restart_of``: the trial a resume started again under this one's id (Ray had not saved it before a hard kill).
NOT_SETTINGS = ("cell", "refine", "restart_of")


def sampled_settings(sampled: dict[str, Any]) -> dict[str, Any]:
    """The trainer settings among a trial's sampled values: its Ray config (or params.json, or MLflow params)
    without the search's bookkeeping (``NOT_SETTINGS``). The one filter: every reader of a trial's values uses it."""
    return {k: v for k, v in sampled.items() if k not in NOT_SETTINGS}


def trial_config(base: TrainConfig, sampled: dict[str, Any]) -> TrainConfig:
    """A trial's settings: the spec's typed base with the sampled values (not the search's bookkeeping) copied in.

    The one place sampled values become settings: the trial, the placement and the benchmarks call it; a
    finished sweep's readers, which validate what they read back, merge ``sampled_settings`` into the base."""
    return base.model_copy(update=sampled_settings(sampled))

_STRICT = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RUN_CONTROL = {"search": {"time_budget_s"}, "failure": {"stall_s", "setup_s"}}  # not in the digest


class Range(BaseModel):
    """A numeric range, optionally per method (LoRA's good LRs sit ~10x above full fine-tuning's)."""

    model_config = _STRICT
    low: float
    high: float
    log: bool = False  # sample (and grid) on a log scale; both bounds must be > 0
    integer: bool = Field(False, alias="int")  # integer-valued (batch_size, lora_r, ...)
    grid: int | None = Field(None, ge=1)  # points for algorithm: grid (log-spaced when log)

    @model_validator(mode="after")
    def _bounds(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low <= high must hold, but got (low={self.low}, high={self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, but got low={self.low}")
        return self

    def grid_points(self) -> list[float]:
        n = self.grid or 1
        if n == 1:
            return [self.low]
        if self.log:
            lo, hi = math.log10(self.low), math.log10(self.high)
            pts = [10 ** (lo + (hi - lo) * i / (n - 1)) for i in range(n)]
        else:
            pts = [self.low + (self.high - self.low) * i / (n - 1) for i in range(n)]
        return [round(p) for p in pts] if self.integer else [float(f"{p:.3g}") for p in pts]


class Dimension(BaseModel):
    """One searched trainer field: a list of values, or a range (either may apply per method or only when...)."""

    model_config = _STRICT
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = Field(False, alias="int")
    grid: int | None = Field(None, ge=1)
    per_method: dict[str, Range] | None = None  # a range for each method; methods not named use low/high
    when: dict[str, list[Any]] | None = None  # sampled only when another field has one of these values

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"values": data} if isinstance(data, list) else data

    @model_validator(mode="after")
    def _shape(self) -> Dimension:
        has_range = self.low is not None or self.high is not None
        if self.values is not None and (has_range or self.per_method):
            raise ValueError("give either values or a range (low/high, per_method), not both")
        if self.values is None and not has_range and not self.per_method:
            raise ValueError("a dimension needs values: [...] or low/high")
        if self.values is not None and not self.values:
            raise ValueError("values must not be empty")
        if has_range:
            Range(low=self.low, high=self.high, log=self.log, integer=self.integer, grid=self.grid)  # validates
        for name in self.per_method or {}:
            if name not in METHODS:
                raise ValueError(f"per_method: unknown method {name!r}; choose from {', '.join(METHODS)}")
        return self

    def range_for(self, method: str | None) -> Range:
        if self.per_method and method in self.per_method:
            r = self.per_method[method]
            return r if r.grid or not self.grid else r.model_copy(update={"grid": self.grid})
        if self.low is None:
            raise ValueError(f"no range for method {method!r}")
        return Range(low=self.low, high=self.high, log=self.log, integer=self.integer, grid=self.grid)

    def corners(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        """What ``load_spec`` checks against TrainConfig, once: each value of a list, each end of each range (a
        field's own bounds, gt=0 and the like, then hold for every value between two ends), as ``(where, values)``."""
        if self.values is not None:
            return [(f"space.{name}={v!r}", {name: v}) for v in self.values]
        ranges: list[tuple[str | None, Range]] = list((self.per_method or {}).items())
        if self.low is not None:
            ranges.append((None, self.range_for(None)))
        out = []
        for method, rng in ranges:
            extra = {"method": method} if method else {}
            for end in (rng.low, rng.high):
                value = int(end) if rng.integer else end
                out.append((f"space.{name}={value!r}" + (f" (method {method})" if method else ""), {name: value, **extra}))
        return out


Mode = Literal["min", "max"]


class Refine(BaseModel):
    """After the grid, bisect each group's divergence edge and narrow its best LR (``sweeps.results.edges``).

    A group is the grid's trials that differ only in learning rate (a method at one batch size). Once a
    group's trials have all finished, the searcher proposes that group's next LRs, for ``rounds`` rounds."""

    model_config = _STRICT
    rounds: int = Field(2, ge=1)
    within: float = Field(2.0, gt=1)  # stop once the edge's interval and the optimum's bracket are this narrow
    max_trials: int | None = Field(None, ge=1)  # at most this many refinement trials in all (None: as needed)


class Search(BaseModel):
    model_config = _STRICT
    # tpe: Optuna's TPESampler (one objective or several); nsga2: NSGAIISampler (a genetic search for the
    # Pareto front of several objectives); random; grid
    algorithm: Literal["tpe", "nsga2", "random", "grid"] = "tpe"
    # the objective, read from each trial's final report; a list ([eval_loss, forgetting]) makes the study
    # multi-objective: Optuna looks for the front of trials that no other trial beats on every metric
    metric: str | list[str] = "eval_loss"
    mode: Mode | list[Mode] = "min"  # one per metric (a single mode applies to every metric)
    n_trials: int | None = Field(None, ge=1)  # tpe/random: how many trials; grid: the grid's size when None
    seed: int = 0
    max_concurrent: int | None = Field(None, ge=1)  # None = as many as the resources allow
    # tpe: random trials before TPE models the space (Optuna's default 10); fewer leaves more of a small
    # budget guided, but TPE's model of a space with several dimensions is poor on few points.
    # nsga2: the population size (its first generation is random)
    startup_trials: int = Field(10, ge=1)
    # wall-clock seconds for the trials of this run (None: no limit), from the start of Ray Tune's run; when
    # they are up the running trials stop where they are (recorded unfinished), the report is written from what
    # finished, and --resume continues (with a fresh budget). The same as --time-budget SECONDS
    time_budget_s: float | None = Field(None, gt=0)
    # grid only: refine the learning rate's edges after the grid (off unless asked for)
    refine: Refine | None = None

    @model_validator(mode="after")
    def _metrics_and_modes(self) -> Search:
        if isinstance(self.metric, list) and not self.metric:
            raise ValueError("metric: give at least one metric")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metric: each metric once, but got {self.metric}")
        if isinstance(self.mode, list) and len(self.mode) != len(self.metrics):
            raise ValueError(f"mode: one per metric ({len(self.metrics)}), but got {self.mode}")
        return self

    @property
    def metrics(self) -> list[str]:
        """The objectives in order; the first is the primary one (ranked, exported, pruned on)."""
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        return list(self.mode) if isinstance(self.mode, list) else [self.mode] * len(self.metrics)

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1


class Divergence(BaseModel):
    model_config = _STRICT
    factor: float = Field(4.0, gt=1)  # smoothed loss > factor x its running minimum (fastai, Lightning LR finders)
    spike: float = Field(10.0, gt=1)  # one report's loss > spike x the largest loss seen so far (Megatron)
    # no loss rule stops a trial before this many reports (a divergence seen earlier stops it then), so every
    # curve has that many points; non-finite values stop it at once
    min_reports: int = Field(1, ge=1)


class Pruning(BaseModel):
    model_config = _STRICT
    divergence: Divergence = Divergence()  # always on
    rule: Literal["none", "median", "percentile", "successive_halving", "hyperband"] = "median"
    scope: Literal["method", "sweep"] = "method"  # median/percentile compare a trial with its own method's trials
    metric: str = "train_loss_ema"  # intermediate value the rule compares, at equal examples_seen
    warmup_reports: int = Field(2, ge=0)  # reports before the rule may prune a trial
    startup_trials: int = Field(4, ge=0)  # finished trials before the rule starts pruning
    percentile: float = Field(25.0, gt=0, lt=100)  # for rule: percentile


class Resources(BaseModel):
    """What each trial asks Ray for. ``resources: auto`` (the default) is ``{gpu: auto}``: on nodes without GPUs, one
    CPU per trial; on nodes with GPUs, a share of a GPU sized from the trial's memory estimate, so that as many trials
    as fit run on each GPU, each capped to its share (``sweeps.launch.placement``). A number is a fixed share per trial."""

    model_config = _STRICT
    cpu: float = Field(1, gt=0)
    gpu: float | Literal["auto"] = "auto"  # a fraction is Ray's accounting; the trial also caps its CUDA memory to it
    gpu_memory_gib: float | None = Field(None, gt=0)  # with gpu: auto, each GPU's memory; None: read from the nodes
    per_method: dict[str, dict[Literal["cpu", "gpu"], float]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _auto(cls, data: Any) -> Any:
        return {"gpu": "auto"} if data == "auto" else data

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, value):
        if value != "auto" and value < 0:
            raise ValueError(f"must be >= 0 or auto, got {value}")
        return value

    @field_validator("per_method")
    @classmethod
    def _methods(cls, value):
        for name, res in (value or {}).items():
            if name not in METHODS:
                raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
            if any(v < 0 for v in res.values()):
                raise ValueError(f"{name}: resources must be >= 0, got {res}")
        return value

    def for_method(self, method: str) -> dict[str, float | str]:
        """``{"cpu": n, "gpu": share or "auto"}`` for a trial of ``method``."""
        res: dict[str, float | str] = {"cpu": self.cpu, "gpu": self.gpu}
        res.update((self.per_method or {}).get(method, {}))
        return res


class Failure(BaseModel):
    model_config = _STRICT
    max_retries: int = Field(1, ge=0)  # Ray retries a crashed trial from its last checkpoint
    checkpoint_every: int = Field(2, ge=0)  # reports between checkpoints (trainable weights only); 0 = none
    # a trial that sends no report for this long (a dead data loader, a deadlocked collective, stuck I/O) is
    # stopped as failed and retried under max_retries. The longest gap between two reports (evaluation
    # included) must fit in it; time spent waiting on the driver does not count. None: no watchdog
    stall_s: float | None = Field(300, gt=0)
    setup_s: float = Field(1800, ge=0)  # added to stall_s for each attempt's first report: model load, the l0 eval


class Tracking(BaseModel):
    model_config = _STRICT
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<sweep dir>/mlflow.db
    experiment: str | None = None  # None: the sweep's name


class Data(BaseModel):
    """Where the trials train and what they are evaluated on. With no ``eval`` and no ``eval_fraction``, the
    built-in facts are evaluated on their paraphrases and a user's file on a held-out 10% of it (TrainConfig)."""

    model_config = _STRICT
    train: str = "builtin:facts"
    eval: str | None = None
    eval_fraction: float | None = Field(None, ge=0, lt=1)

    @model_validator(mode="after")
    def _one_eval_source(self) -> Data:
        if self.eval is not None and self.eval_fraction:
            raise ValueError("give eval (a file) or eval_fraction (a held-out share of train), not both")
        return self


class SweepSpec(BaseModel):
    model_config = _STRICT
    name: str
    model: str = "smollm2-135m"
    data: Data = Data()
    train: dict[str, Any] = {}  # fixed TrainConfig fields for every trial
    search: Search = Search()
    space: dict[str, Dimension]
    pruning: Pruning = Pruning()
    resources: Resources = Resources()
    failure: Failure = Failure()
    tracking: Tracking = Tracking()
    output_dir: str = "sweeps_out"  # the sweep's folder is <output_dir>/<name>
    source: str | None = None  # the spec file, filled in by load_spec

    @model_validator(mode="before")
    @classmethod
    def _grid_prunes_by_divergence(cls, data: Any) -> Any:
        """A grid is a map: unless its spec names a rule, it stops trials by the divergence rules only (see
        ``_grid_problems``), so its default rule is none, not the median rule of a search."""
        if not isinstance(data, dict) or not isinstance(data.get("search"), dict):
            return data
        pruning = data.get("pruning", {})
        if data["search"].get("algorithm") == "grid" and isinstance(pruning, dict) and "rule" not in pruning:
            data = {**data, "pruning": {**pruning, "rule": "none"}}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("name must be letters, digits, '-', '_' or '.'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        problems = []
        fields = set(TrainConfig.model_fields)
        for key in self.space:
            if key not in fields:
                problems.append(f"space.{key}: not a trainer field")
        for key in self.train:
            if key in ("model", "train_data", "eval_data", "eval_fraction"):
                problems.append(f"train.{key}: set it at the top level (model:, data:), not under train:")
        if self.search.algorithm == "grid":
            for key, dim in self.space.items():
                ranges_gridded = bool(dim.per_method) and all(r.grid for r in dim.per_method.values())
                if dim.values is None and not dim.grid and not ranges_gridded:
                    problems.append(f"space.{key}: algorithm grid needs values: [...] or grid: N points")
        if self.search.refine and self.search.algorithm != "grid":
            problems.append(f"search.refine: refines a grid's learning rates; algorithm {self.search.algorithm} "
                            "samples its own (use algorithm: grid, or drop refine)")
        elif self.search.refine and "learning_rate" not in self.space:
            problems.append("search.refine: the space has no learning_rate to refine")
        problems.extend(self._multi_objective_problems())
        problems.extend(self._grid_problems())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _grid_problems(self) -> list[str]:
        """The same grid must give the same map. A median, percentile or halving rule compares a trial with whichever
        trials had reached that point, so with trials side by side Ray's timing would decide which cells are pruned
        (and where refinement goes). Run one at a time, the trials before a cell are always the cells before it in the
        grid's fixed order: then a rule is allowed."""
        rule = self.pruning.rule
        if self.search.algorithm != "grid" or rule == "none" or self.search.max_concurrent == 1:
            return []
        return [f"pruning.rule: {rule} on a grid compares each trial with whichever trials happened to finish first, so "
                "two runs of the same spec could map different cells as pruned; a grid stops trials by the divergence "
                "rules only (rule: none, its default), or give search.max_concurrent: 1 (then the trials before a cell "
                "are always the cells before it in the grid's order)"]

    def _multi_objective_problems(self) -> list[str]:
        """Optuna cannot prune a multi-objective study (Trial.report raises); the bridge's own rules can."""
        if not self.search.multi_objective:
            return []
        problems = []
        if "forgetting" in self.search.metrics and self.train.get("forgetting") is False:
            problems.append("search.metric: forgetting is an objective, but train.forgetting is false: it is never measured")
        rule, primary = self.pruning.rule, self.search.metrics[0]
        if rule in ("successive_halving", "hyperband"):
            problems.append(f"pruning.rule: {rule} cannot prune a multi-objective search (Optuna's pruners need one "
                            "objective); use rule: none, or median / percentile on the primary metric")
        elif rule != "none" and "rule" not in self.pruning.model_fields_set:
            problems.append(
                f"pruning.rule: the default rule ({rule}) would prune on the primary metric {primary} alone and can stop "
                f"the trials that are best on {', '.join(self.search.metrics[1:])}, which the front needs; Optuna "
                f"cannot prune a multi-objective study. Say rule: none (the divergence rules stay on), or name "
                f"rule: median or percentile to apply it to {primary}'s curve ({self.pruning.metric}) anyway")
        return problems

    @property
    def methods(self) -> list[str]:
        dim = self.space.get("method")
        return list(dim.values) if dim and dim.values else [self.train.get("method", TrainConfig().method)]

    @cached_property
    def base(self) -> TrainConfig:
        """The fixed settings every trial shares, typed. ``load_spec`` has checked them with every value of the space,
        so a trial is ``spec.base.model_copy(update=sampled)``, with no second validation."""
        return TrainConfig.model_validate(self.base_train())

    def base_train(self) -> dict[str, Any]:
        """The fixed trainer fields every trial shares (before the sampled values), as a dict."""
        return {
            **self.train,
            "model": self.model,
            "train_data": self.data.train,
            "eval_data": self.data.eval,
            "eval_fraction": self.data.eval_fraction,
            "save_model": False,
            "output_dir": None,
        }

    def sweep_dir(self) -> Path:
        return Path(self.output_dir).resolve() / self.name

    def thresholds(self) -> Thresholds:
        """The curve rules' thresholds: the divergence that stops a trial is the one that classifies it."""
        d = self.pruning.divergence
        return Thresholds(factor=d.factor, spike=d.spike)

    def digest(self) -> str:
        """What makes two specs the same sweep, for --resume.

        How long to run or wait (the time budget, the stall watchdog) is left out: passing --time-budget, or
        giving a resumed sweep more patience, must not make it a different sweep; and sweeps started before
        these fields existed keep their digest.
        """
        dump = self.model_dump(mode="json", exclude=_RUN_CONTROL)
        if dump["search"].get("refine") is None:  # a sweep from before refinement existed keeps its digest
            dump["search"].pop("refine", None)
        return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:12]


def load_spec(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read, override, validate and cross-check a sweep spec; raise one UserError listing every problem."""
    source = str(path)
    data = apply_overrides(read_yaml(path), overrides or [], source=source)
    data = _resolve_paths(data, Path(path).resolve().parent)
    try:
        spec = SweepSpec.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise UserError(validation_message(exc, source)) from None
    _check_trials_validate(spec, source)
    return spec


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    block = data.get("data")
    if isinstance(block, dict):
        block = dict(block)
        for key in ("train", "eval"):
            value = block.get(key)
            if isinstance(value, str) and not value.startswith("builtin:") and not Path(value).is_absolute():
                block[key] = str((base / value).resolve())
        data = {**data, "data": block}
    return data


def _check_trials_validate(spec: SweepSpec, source: str) -> None:
    """Every categorical value and range end must make a valid TrainConfig with the fixed settings, as written:
    trials copy the sampled values into ``spec.base`` unconverted (a quoted "0.001" would stay a string)."""
    corners = [("train", {})] + [corner for name, dim in spec.space.items() for corner in dim.corners(name)]
    problems = []
    for where, values in corners:
        try:
            cfg = TrainConfig.model_validate({**spec.base_train(), **values})
        except ValidationError as exc:
            for line in validation_message(exc, source).splitlines()[1:]:
                problems.append(f"{line.strip()[2:]} [in {where}]")
            continue
        problems.extend(f"{key}: the trainer reads {v!r} as {getattr(cfg, key)!r}; write that [in {where}]"
                        for key, v in values.items() if getattr(cfg, key) != v)
    if problems:
        unique = list(dict.fromkeys(problems))
        raise UserError(f"{source}: {len(unique)} problem(s) in the configuration:\n" + "\n".join(f"  - {p}" for p in unique))
