"""The Ray Tune trial: one process runs one ``trainer.train``.

The first line turns Ray's dict into a typed ``TrainConfig``. Reports go to
``ray.tune.report``; every ``checkpoint_every`` reports the trainer's state
(trainable weights, optimizer, position in the data; for LoRA only the adapter)
is attached, so a retried trial resumes where it was. Trials never write to
MLflow: the driver is the only writer.
"""
from __future__ import annotations

import math
import os
import tempfile
from typing import Any

from ray import tune
from ray.tune import Checkpoint

from trainer.config import TrainConfig


def run_trial(config: dict[str, Any], *, base: dict[str, Any], metric: str, checkpoint_every: int) -> None:
    """Ray Tune function trainable (bound with ``tune.with_parameters``)."""
    sampled = {k: v for k, v in config.items() if k != "cell"}  # "cell": the grid index, not a trainer field
    cfg = TrainConfig.model_validate({**base, **sampled})
    threads = _trial_cpus()
    if cfg.threads is None and threads:
        cfg = cfg.model_copy(update={"threads": threads})

    from trainer.loop import train
    from trainer.quiet import quiet_libraries

    quiet_libraries()
    state = {"reports": 0, "objective": None}
    node = _node_id()

    def report(metrics: dict[str, Any], checkpoint=None) -> None:
        state["reports"] += 1
        if metrics.get(metric) is not None and math.isfinite(metrics[metric]):
            state["objective"] = metrics[metric]
        # Every result carries the objective: the last known value, l0 before the first eval.
        result = {**metrics, "objective": state["objective"] if state["objective"] is not None else metrics["l0"],
                  "node_id": node}
        due = checkpoint is not None and checkpoint_every and state["reports"] % checkpoint_every == 0
        if due and not metrics.get("done"):
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint(tmp)
                tune.report(result, checkpoint=Checkpoint.from_directory(tmp))
        else:
            tune.report(result)

    resume = tune.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as path:
            train(cfg, report, resume_from=path)
    else:
        train(cfg, report)


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
