"""The Ray Tune trial: one process runs one ``trainer.train``.

The first line copies the sampled values into the spec's typed ``TrainConfig``. Reports go to
``ray.tune.report``; every ``checkpoint_every`` reports the trainer's state
(trainable weights, optimizer, position in the data; for LoRA only the adapter)
is attached, so a retried trial resumes where it was. A stall watchdog
(``sweeps.launch.watchdog``) fails a trial that stops reporting, so Ray retries it too;
its reason goes to the driver as one last result, ``{"stalled": reason}``.
Trials never write to MLflow: the driver is the only writer.
"""
from __future__ import annotations

import gc
import math
import os
import tempfile
import traceback
import zipfile
from contextlib import nullcontext
from typing import Any

import ray
from ray import tune
from ray.tune import Checkpoint

from sweeps.faults import as_storage_problem
from sweeps.launch.placement import memory_cap
from sweeps.launch.watchdog import Watchdog
from sweeps.spec import trial_config
from trainer.config import TrainConfig


def objective_keys(metrics: list[str]) -> list[str]:
    """The result keys Ray Tune's searcher reads: ``objective`` for one metric, ``objective_<metric>`` for each of several."""
    return ["objective"] if len(metrics) == 1 else [f"objective_{m}" for m in metrics]


def run_trial(
    config: dict[str, Any], *, base: TrainConfig, metrics: list[str], checkpoint_every: int,
    stall_s: float | None = None, setup_s: float = 0.0, ended: dict[str, dict] | None = None,
) -> None:
    """Ray Tune function trainable (bound with ``tune.with_parameters``); ``stall_s`` None: no watchdog.

    ``base`` is the spec's ``base``: validated once, with every value and range end of the space, when the spec
    was loaded; so the sampled values are copied in, not validated again. ``ended``: on a resume, the trials that
    had ended (trial id -> last result, ``sweeps.launch.resume``) though Ray's saved state still runs them."""
    recorded = (ended or {}).get(tune.get_context().get_trial_id())
    if recorded is not None:
        tune.report(recorded)  # said again, not trained again: Ray and the searcher close the trial
        return
    cfg = trial_config(base, config)
    threads = _trial_cpus()
    if cfg.threads is None and threads:
        cfg = cfg.model_copy(update={"threads": threads})
    gpu = _gpu_placement(cfg)

    # torch and transformers: imported in the worker when its first trial starts; the driver, which imports this
    # module, gets them in the preflight's thread while Ray starts (sweeps.launch.sweep)
    from trainer.loop import train
    from trainer.quiet import quiet_libraries

    quiet_libraries()
    state: dict[str, Any] = {"reports": 0, "seen": {}, "last": {}}
    node = _node_id()
    keys = objective_keys(metrics)
    watchdog = Watchdog(stall_s, setup_s) if stall_s else None

    def report(values: dict[str, Any], checkpoint=None) -> None:
        state["reports"] += 1
        values = {**values, **gpu}
        if values.get("done") and "out of memory" in str(values.get("reason", "")) and gpu:
            cap = f", capped at {gpu['mem_cap_gib']:.2f} GiB" if "mem_cap_gib" in gpu else ""
            values["reason"] += (f" (estimated {gpu['mem_estimate_gib']:.2f} GiB; its share: {gpu['gpu_share']:g} "
                                 f"of a GPU{cap})")
        seen = state["seen"]
        seen.update((m, values[m]) for m in metrics if isinstance(values.get(m), (int, float)) and math.isfinite(values[m]))
        # Every result carries the objective: the primary metric's last known value, l0 before the first eval.
        # With several metrics every result has each one's key (Ray checks that it is there): its last value,
        # None until measured (forgetting is measured once, at the end).
        primary = seen.get(metrics[0], values["l0"])
        objectives = {k: seen.get(m) for k, m in zip(keys, metrics)}
        result = {**values, **objectives, "objective": primary, "node_id": node}
        state["last"] = {k: result[k] for k in ("step", "examples_seen", "objective") if k in result}
        due = checkpoint is not None and checkpoint_every and state["reports"] % checkpoint_every == 0
        if due and not values.get("done"):
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint(tmp)
                _send(result, watchdog, checkpoint=Checkpoint.from_directory(tmp))
        else:
            _send(result, watchdog)

    resume = tune.get_checkpoint()

    def work() -> None:
        if resume is not None:
            with resume.as_directory() as path:
                # gone (a resume keeps Ray's restore going with an empty folder) or cut short by a full disk:
                # the trial starts again from its beginning rather than failing
                train(cfg, report, resume_from=path if usable_checkpoint(path) else None)
        else:
            train(cfg, report)

    if watchdog is None:
        releasing(work)
    else:
        # The stall result carries the last report's step and progress, so no reader takes it for a new point.
        releasing(lambda: watchdog.run(
            work, on_stall=lambda reason: tune.report({**state["last"], "stalled": reason, "node_id": node})))


def releasing(work) -> None:
    """Run ``work`` and free what it held before the worker (reused by Ray) starts another trial: the model, the
    optimizer state and the CUDA cache (ray#23971: a stopped trial's GPU memory stayed taken). A stop (pruned) ends
    as an exception from ``tune.report``: its traceback's frames would keep the model alive, so they are cleared."""
    try:
        work()
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        _release_memory()


def _release_memory() -> None:
    import torch  # here, not at the top: the driver imports this module before its preflight has loaded torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():  # on a CPU, reference counting frees it in time
        gc.collect()  # a full collection takes seconds in a big process: only where the memory is a GPU's
        torch.cuda.empty_cache()


def _gpu_placement(cfg: TrainConfig) -> dict[str, Any]:
    """The trial's GPU share (its Ray resources), the GPUs Ray gave it, its memory estimate, and the CUDA memory cap
    applied to the share; empty for a trial without a GPU."""
    try:
        share = float(tune.get_context().get_trial_resources().required_resources.get("GPU", 0))
    except Exception:  # outside a trial (unit tests)
        return {}
    if not share:
        return {}
    from trainer.memory import estimate  # torch, as below

    out: dict[str, Any] = {"gpu_share": share, "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                           "mem_estimate_gib": estimate(cfg, device="cuda").total_gib}
    import torch  # here, not at the top: the driver imports this module before its preflight has loaded torch

    if torch.cuda.is_available():
        total_gib = torch.cuda.get_device_properties(0).total_memory / 1024**3  # Ray made the trial's GPU device 0
        cap = memory_cap(share, total_gib)
        torch.cuda.set_per_process_memory_fraction(cap, 0)
        out["mem_cap_gib"] = cap * total_gib
    return out


def _send(result: dict[str, Any], watchdog: Watchdog | None, checkpoint: Checkpoint | None = None) -> None:
    with watchdog.reporting(result.get("step")) if watchdog else nullcontext():
        try:
            tune.report(result, checkpoint=checkpoint)
        except Exception as exc:
            full = as_storage_problem(exc) if checkpoint is not None else None
            if full is None:
                raise
            # the checkpoint could not be stored (a full disk): the driver stops the sweep with that one line
            # (sweeps.launch.folder), so --resume continues from the last checkpoint stored whole
            tune.report({**result, "storage_problem": {"why": full.why, "path": full.path, "what": full.what}})
            raise


def usable_checkpoint(path: str) -> bool:
    """A checkpoint the trainer wrote whole: its state file is there and ends as a complete zip (torch.save's)."""
    state = os.path.join(path, "trainer_state.pt")
    return os.path.isfile(state) and zipfile.is_zipfile(state)


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
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray
        return None
