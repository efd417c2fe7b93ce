"""The Ray Tune trial: one process runs one ``trainer.train``.

The first line turns Ray's dict into a typed ``TrainConfig``. Reports go to
``ray.tune.report``; every ``checkpoint_every`` reports the trainer's state
(trainable weights, optimizer, position in the data; for LoRA only the adapter)
is attached, so a retried trial resumes where it was. A stall watchdog
(``sweeps.watchdog``) fails a trial that stops reporting, so Ray retries it too;
its reason goes to the driver as one last result, ``{"stalled": reason}``.
Trials never write to MLflow: the driver is the only writer.
"""
from __future__ import annotations

import math
import os
import tempfile
from contextlib import nullcontext
from typing import Any

from ray import tune
from ray.tune import Checkpoint

from sweeps.watchdog import Watchdog
from trainer.config import TrainConfig


def run_trial(
    config: dict[str, Any], *, base: dict[str, Any], metric: str, checkpoint_every: int,
    stall_s: float | None = None, setup_s: float = 0.0,
) -> None:
    """Ray Tune function trainable (bound with ``tune.with_parameters``); ``stall_s`` None: no watchdog."""
    sampled = {k: v for k, v in config.items() if k != "cell"}  # "cell": the grid index, not a trainer field
    cfg = TrainConfig.model_validate({**base, **sampled})
    threads = _trial_cpus()
    if cfg.threads is None and threads:
        cfg = cfg.model_copy(update={"threads": threads})

    from trainer.loop import train
    from trainer.quiet import quiet_libraries

    quiet_libraries()
    state = {"reports": 0, "objective": None, "last": {}}
    node = _node_id()
    watchdog = Watchdog(stall_s, setup_s) if stall_s else None

    def report(metrics: dict[str, Any], checkpoint=None) -> None:
        state["reports"] += 1
        if metrics.get(metric) is not None and math.isfinite(metrics[metric]):
            state["objective"] = metrics[metric]
        # Every result carries the objective: the last known value, l0 before the first eval.
        result = {**metrics, "objective": state["objective"] if state["objective"] is not None else metrics["l0"],
                  "node_id": node}
        state["last"] = {k: result[k] for k in ("step", "examples_seen", "objective") if k in result}
        due = checkpoint is not None and checkpoint_every and state["reports"] % checkpoint_every == 0
        if due and not metrics.get("done"):
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint(tmp)
                _send(result, watchdog, checkpoint=Checkpoint.from_directory(tmp))
        else:
            _send(result, watchdog)

    resume = tune.get_checkpoint()

    def work() -> None:
        if resume is not None:
            with resume.as_directory() as path:
                train(cfg, report, resume_from=path)
        else:
            train(cfg, report)

    if watchdog is None:
        work()
    else:
        # The stall result carries the last report's step and progress, so no reader takes it for a new point.
        watchdog.run(work, on_stall=lambda reason: tune.report({**state["last"], "stalled": reason, "node_id": node}))


def _send(result: dict[str, Any], watchdog: Watchdog | None, checkpoint: Checkpoint | None = None) -> None:
    with watchdog.reporting(result.get("step")) if watchdog else nullcontext():
        tune.report(result, checkpoint=checkpoint)


def _trial_cpus() -> int | None:
    try:
        cpus = tune.get_context().get_trial_resources().required_resources.get("CPU")
    except Exception:  # outside a trial (unit tests)
        cpus = None
    if cpus:
        return max(1, int(cpus))
    env = os.environ.get("OMP_NUM_THREADS")
    return int(env) if env and env.isdigit() else None


def _node_id() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray
        return None
