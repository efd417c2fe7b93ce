"""Run a sweep: Ray Tune schedules, Optuna samples and prunes, MLflow records, then the map is drawn.

``run_sweep(spec, ...)`` is what ``python sweeps/run.py SPEC.yaml`` calls.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

# Ray's own console output: its table prints every internal key and TensorBoard warnings; ours is
# sweeps.launch.progress. Ray reads these when it is first imported, so they are set before the imports below.
_QUIET_RAY = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # result.json: sweeps.launch.folder writes it; no TensorBoard/CSV
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_DEDUP_LOGS": "0",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # not "Creating initial MLflow database tables..."
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",  # a failed trial is one line (sweeps.launch.progress); its traceback is in error.txt
}
for _key, _value in _QUIET_RAY.items():
    os.environ.setdefault(_key, _value)

import optuna  # noqa: E402
import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig  # noqa: E402

from sweeps.faults import Incomplete, atomic_write  # noqa: E402
from sweeps.launch.budget import TimeBudget  # noqa: E402
from sweeps.launch.folder import MachineFaults, TrialFiles  # noqa: E402
from sweeps.launch.placement import (  # noqa: E402
    ignored_gpus_warning,
    largest_trials,
    plan_lines,
    ray_nodes,
    trial_resources,
)
from sweeps.launch.progress import ProgressPrinter, WarmReport  # noqa: E402
from sweeps.launch.pruning import PruningSearch, make_pruner, search_finished  # noqa: E402
from sweeps.launch.refine import Refiner  # noqa: E402
from sweeps.launch.resume import ended_trials, keep_restorable  # noqa: E402
from sweeps.launch.space import DefineByRun, GridSpace, make_sampler, max_refinement, n_trials  # noqa: E402
from sweeps.launch.tracking import MlflowWriter, Tracker, configure_client_timeouts  # noqa: E402
from sweeps.launch.trial import run_trial  # noqa: E402
from sweeps.results.collect import collect_records  # noqa: E402
from sweeps.spec import SweepSpec  # noqa: E402
from trainer.config import eval_size_warning  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.methods import EXTENSIONS_ENV, check_method_supports  # noqa: E402
from trainer.outputs import provenance  # noqa: E402

# Kept inside functions, on purpose: torch and transformers (trainer.data, trainer.models) are imported by the
# preflight, in its thread, while Ray starts; matplotlib and the report (sweeps.launch.finish) once a slot idles at
# the sweep's tail (sweeps.launch.progress.WarmReport), not at start.

log = logging.getLogger(__name__)


def tracking_uri(spec: SweepSpec) -> str:
    """The spec's URI, else $MLFLOW_TRACKING_URI, else SQLite beside the sweeps: <output_dir>/mlflow.db."""
    if spec.tracking.uri:
        return spec.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(spec.output_dir).resolve() / 'mlflow.db'}"




def run_sweep(spec: SweepSpec, *, resume: bool = False, address: str | None = None) -> Path:
    """Run (or resume) the sweep; returns its folder. Raises UserError for bad input before any trial starts."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    sweep_dir = spec.sweep_dir()
    resume = _check_resume(spec, sweep_dir, resume)
    with ThreadPoolExecutor(1) as pool:  # the data and model are read while Ray starts (its processes do the work)
        checked = pool.submit(_preflight_data, spec)
        try:
            connected = _init_ray(spec, address)
        finally:
            checked.result()  # bad input: its UserError, whatever Ray did
    nodes = ray_nodes()
    placer = trial_resources(spec, nodes)
    _check_resources(spec, placer, nodes)
    for line in [*plan_lines(spec, nodes), ignored_gpus_warning(spec, nodes)]:
        if line:
            print(line, flush=True)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(sweep_dir / "spec.json", json.dumps({"digest": spec.digest(), "spec": spec.model_dump(mode="json")}, indent=1))

    configure_client_timeouts()
    uri = tracking_uri(spec)
    tracker = Tracker(uri, spec.tracking.experiment or spec.name, sweep_dir, _artifact_root(spec, uri))
    print(f"sweep {spec.name}: {'resuming' if resume else 'starting'} in {sweep_dir}", flush=True)
    print(f"mlflow: {uri} (experiment {tracker.experiment!r})", flush=True)

    with ThreadPoolExecutor(1) as pool:
        if resume:  # Ray restores the writer it saved with the sweep, which cannot wait: the parent run first
            parent_made = Future()
            parent_made.set_result(_parent_run(spec, tracker))
            tracker.settle()  # what a hard kill left logged in MLflow but not yet noted in mlflow.json
        else:
            # the parent run is created (a new store: about 2 s) while Tune starts; the writer waits for it at its
            # first event, so every trial's run is still created under it
            parent_made = pool.submit(_parent_run, spec, tracker)
        writer = MlflowWriter(tracker, spec.name, ready=parent_made)
        tuner, n_total = _tuner(spec, sweep_dir, writer, resume, placer)
        t0 = time.time()
        with TimeBudget(spec.search.time_budget_s) as budget:  # counted, as Ray's own, from the start of the trials
            tuner.fit()  # results are read back from the sweep folder (collect_records), which survives a resume
        wall = time.time() - t0
        parent = parent_made.result()

    from sweeps.launch.finish import finish_sweep

    records = collect_records(sweep_dir)
    finished = len([r for r in records if r.final.get("done") or r.error or r.stopped_by])
    with ThreadPoolExecutor(1) as pool:  # the trials are over: Ray stops (about 1.5 s) while the report is drawn
        if connected:  # a Ray this sweep started (or joined): stopped, or left (a cluster's keeps running)
            pool.submit(ray.shutdown)
        left = finish_sweep(spec, sweep_dir, records, tracker, parent, wall_s=wall)
    if spec.search.refine:  # the searcher ends a refining sweep: it is complete when it said so
        stopped_early = budget.expired or not search_finished(spec.name)
    else:
        stopped_early = finished < n_total
    if stopped_early:
        why = f"the time budget ({budget.seconds:g} s) was spent: " if budget.expired else ""
        print(f"\n{why}the sweep stopped with {finished}/{len(records) if spec.search.refine else n_total} trials finished; "
              "continue it with:\n"
              f"  python sweeps/run.py {spec.source} --resume", flush=True)
    if left:  # the sweep's last line: MLflow does not have all of it yet
        raise Incomplete(f"mlflow: {left} operation(s) could not be written to {tracker.uri} ({tracker.why}); they "
                         f"are kept in {sweep_dir / 'mlflow_pending.jsonl'}. Replay them with: "
                         f"python sweeps/run.py {spec.source} --resume")
    return sweep_dir


def _check_resume(spec: SweepSpec, sweep_dir: Path, resume: bool) -> bool:
    state = sweep_dir / "spec.json"
    exists = state.is_file() and any(sweep_dir.glob("tuner.pkl"))
    if resume and not exists:
        raise UserError(f"--resume: no sweep named {spec.name!r} in {sweep_dir.parent} to resume")
    if exists:
        saved = json.loads(state.read_text())
        if saved.get("digest") != spec.digest():
            raise UserError(
                f"{spec.source}: sweep {spec.name!r} already exists in {sweep_dir} with a different spec; "
                "give the sweep a new name (name=...) or delete that folder"
            )
        return True  # rerunning with the same name continues it
    return False


def _preflight_data(spec: SweepSpec) -> None:
    """Read the data and the model before Ray starts: bad input fails in seconds, with nothing written."""
    from trainer.data import read_examples, split_records, tokenize
    from trainer.models import load_tokenizer, resolve_model_dir

    try:
        train = read_examples(spec.data.train)
    except UserError as exc:
        raise UserError(f"{spec.source}: data.train: {exc}") from None
    base = spec.base  # the eval source resolved, as every trial has it
    try:
        train_part, ev = split_records(train, base.eval_data, base.eval_fraction)
    except UserError as exc:
        raise UserError(f"{spec.source}: data.eval: {exc}") from None
    print(f"{base.eval_plan()}: {len(ev)} eval records, {len(train_part)} training records", flush=True)
    if eval_size_warning(len(ev)):
        print(eval_size_warning(len(ev)), flush=True)
    try:
        model_dir = resolve_model_dir(spec.model)  # converts the packaged model once per machine
    except UserError as exc:
        raise UserError(f"{spec.source}: {exc}") from None
    tokenize(train[:1] + ev[:1], load_tokenizer(model_dir), 4096)
    try:  # a method that cannot tune this model fails here, not as a traceback in each of its trials
        check_method_supports(spec.methods, model_dir, model_label=spec.model, trust_remote_code=base.trust_remote_code)
    except UserError as exc:
        raise UserError(f"{spec.source}: {exc}") from None


def _init_ray(spec: SweepSpec, address: str | None) -> bool:
    """Start a local Ray instance, or join the cluster at ``address``; False when Ray was already up (a caller's)."""
    address = address or os.environ.get("RAY_ADDRESS")
    # EXTENSIONS_ENV: every worker imports the same method modules as this driver (trainer.methods)
    env = {k: os.environ[k] for k in ("FINETUNE_SWEEPS_CACHE", "RAY_AUTH_MODE", EXTENSIONS_ENV) if k in os.environ}
    # TUNE_FUNCTION_THREAD_TIMEOUT_S: how long a reused worker waits for the last trial's thread to end (it frees the
    # trial's GPU memory, sweeps.launch.trial.releasing) before Ray gives up reusing it and fails the next trial; Ray's is 2 s
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TUNE_FUNCTION_THREAD_TIMEOUT_S="30")
    common = dict(log_to_driver=False, logging_level=logging.ERROR, runtime_env={"env_vars": env})
    if ray.is_initialized():
        return False
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **common)
        except Exception as exc:  # auth, version mismatch, a head that went away
            hint, chain, cause = "", [], exc
            while cause is not None and len(chain) < 5:
                chain.append(f"{type(cause).__name__}: {cause}")
                cause = cause.__cause__ or cause.__context__
            if "auth" in " ".join(chain).lower():
                hint = ("; the cluster uses token authentication: set RAY_AUTH_MODE=token and the cluster's token "
                        "(RAY_AUTH_TOKEN, or ~/.ray/auth_token copied from the head node)")
            raise UserError(f"--address {address}: could not join the Ray cluster ({type(exc).__name__}){hint}") from None
    else:
        # address="local": never reattach to a stale cluster recorded in Ray's temp folder (it hangs for minutes)
        ray.init(address="local", include_dashboard=False, **common)
    return True


def _check_reachable(address: str) -> None:
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=10):
            pass
    except (OSError, ValueError):
        raise UserError(f"--address {address}: no Ray head answers there (is `ray start --head` running?)") from None


def _check_resources(spec: SweepSpec, placer, nodes) -> None:
    """Every method's largest trial fits on some node (CPUs and GPU share), before any trial starts."""
    for method, cfg in largest_trials(spec, placer).items():
        share = placer.share(cfg)
        if not any(n.cpus >= share.cpu and n.gpus >= share.gpu for n in nodes):
            raise UserError(
                f"{spec.source}: resources for method {method} ask for cpu={share.cpu:g}, gpu={share.gpu:g} per trial, "
                f"but no node has that much (cluster: {sum(n.cpus for n in nodes):g} CPU, {sum(n.gpus for n in nodes):g} GPU)"
            )


def _artifact_root(spec: SweepSpec, uri: str) -> str | None:
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        return (Path(spec.output_dir).resolve() / "mlartifacts" / (spec.tracking.experiment or spec.name)).as_uri()
    return None


def _parent_run(spec: SweepSpec, tracker) -> str | None:
    prov = provenance()
    tags = {"sweep": spec.name, "spec_digest": spec.digest(), "git_sha": prov["git_sha"] or "unknown",
            **{f"version.{k}": v for k, v in prov["versions"].items()}, "role": "sweep",
            "sweep_dir": str(spec.sweep_dir())}
    try:
        parent = tracker.parent_run(spec.model_dump(mode="json"), tags)
    except Exception as exc:  # the sweep still runs without tracking; trials are queued for replay
        print(f"mlflow: could not create the sweep's parent run at {tracker.uri}: {exc}", flush=True)
        return None
    if spec.source and Path(spec.source).is_file():
        tracker.submit({"op": "artifact", "trial": None, "path": str(Path(spec.source).resolve()), "dest": "spec"})
    return parent


def _tuner(spec: SweepSpec, sweep_dir: Path, writer, resume: bool, placer):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = spec.base
    total_examples = base.max_steps * base.examples_per_step if base.max_steps else None
    if total_examples is None:
        from trainer.data import run_records  # torch: imported by now (the preflight)

        total_examples = math.ceil(base.epochs * len(run_records(base)[0]))  # after the held-out split
    failure = spec.failure
    ended = {}
    if resume:  # what a hard kill left Ray's saved state without (sweeps.launch.resume)
        ended = ended_trials(sweep_dir)
        keep_restorable(sweep_dir, ended)
    trainable = tune.with_parameters(
        run_trial, base=base, metrics=spec.search.metrics, checkpoint_every=failure.checkpoint_every,
        stall_s=failure.stall_s, setup_s=failure.setup_s, ended=ended,
    )
    trainable = tune.with_resources(trainable, placer)  # per trial, from its settings (sweeps.launch.placement)
    n_total = n_trials(spec)
    refiner, n_refine = None, 0
    if spec.search.refine:
        refiner, n_refine = Refiner(spec, n_total), max_refinement(spec, n_total)
    storage = optuna.storages.RDBStorage(f"sqlite:///{sweep_dir / 'optuna.db'}")
    space = GridSpace(spec) if spec.search.algorithm == "grid" else DefineByRun(spec)
    progress = ProgressPrinter(n_total, spec.search.metrics[0], sweep_dir / "stops.jsonl", refining=bool(refiner))
    if resume:
        # Ray restores the searcher (the Optuna study and its trial map) and the stopper from the sweep folder
        return tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True), n_total
    bridge = PruningSearch(
        spec, space=space, sampler=make_sampler(spec), storage=storage,
        pruner=make_pruner(spec.pruning, base.report_every, total_examples),
        stops_file=sweep_dir / "stops.jsonl", report_every=base.report_every, refiner=refiner,
    )
    tuner = tune.Tuner(
        trainable,
        # with refinement, at most the refiner's bound: it ends the search itself when nothing is left to refine
        tune_config=TuneConfig(search_alg=bridge, num_samples=n_total + n_refine,
                               max_concurrent_trials=spec.search.max_concurrent,
                               reuse_actors=True),
        run_config=RunConfig(
            name=spec.name, storage_path=str(sweep_dir.parent), stop=bridge,
            callbacks=[MachineFaults(), TrialFiles(), writer, progress, WarmReport()],  # the files first, in the sweep folder
            failure_config=FailureConfig(max_failures=spec.failure.max_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=1), verbose=0,
        ),
    )
    return tuner, n_total
