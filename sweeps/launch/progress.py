"""Live progress on the terminal: one line per finished trial and a running tally.

Ray's own table is switched off (``verbose=0``): it prints every internal key.
"""
from __future__ import annotations

import math
import threading
import time

from ray.tune import Callback

from sweeps.launch.tracking import trial_error
from sweeps.results.records import Status, read_stops, trial_outcome


class ProgressPrinter(Callback):
    def __init__(self, n_total: int, metric: str, stops_file, refining: bool = False):
        self.n_total, self.metric, self.stops_file = n_total, metric, stops_file
        # refinement adds trials as results come in: "7 done of 4 + refinement"
        self.total = f"{n_total} + refinement" if refining else str(n_total)
        self.done = 0
        self.best: tuple[float, str] | None = None
        self.t0 = time.time()
        self._last_tick = 0.0

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"[{self._clock()}] start   {_label(trial)}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, trials, error=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, trials, error=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        print(f"[{self._clock()}] retrying  {_label(trial)}  {trial_error(trial)}  (failure {trial.num_failures})",
              flush=True)

    def on_step_end(self, iteration, trials, **info):
        now = time.time()
        if now - self._last_tick > 30:
            self._last_tick = now
            running = sum(t.status == "RUNNING" for t in trials)
            print(f"[{self._clock()}] {self.done} done of {self.total}, {running} running", flush=True)

    def _finish(self, trial, trials, error: bool) -> None:
        self.done += 1
        last = trial.last_result or {}
        stop = read_stops(self.stops_file).get(trial.trial_id)
        outcome, reason = trial_outcome(last, stop, trial_error(trial) if error else None)
        value = last.get(self.metric, last.get("objective"))
        shown = f"{self.metric} {value:.4f}" if isinstance(value, float) and math.isfinite(value) else ""
        if outcome == Status.COMPLETED and isinstance(value, float) and (self.best is None or value < self.best[0]):
            self.best = (value, _label(trial))
        print(f"[{self._clock()}] {outcome:<9} {_label(trial)}  {shown}  {reason}  ({self.done} of {self.total})", flush=True)

    def _clock(self) -> str:
        s = int(time.time() - self.t0)
        return f"{s // 60:02d}:{s % 60:02d}"


def _label(trial) -> str:
    c = trial.config
    parts = [trial.trial_id.split("_")[-1], str(c.get("method", ""))]
    if c.get("refine"):
        parts.append(f"(refine {c['refine']})")
    if "learning_rate" in c:
        parts.append(f"lr={c['learning_rate']:.2g}")
    for key in ("batch_size", "epochs", "lora_r"):
        if key in c:
            parts.append(f"{key.split('_')[0] if key != 'lora_r' else 'r'}={c[key]}")
    return " ".join(parts)


class WarmReport(Callback):
    """Imports what the end-of-sweep report needs (matplotlib, Optuna's fANOVA with scikit-learn: about 3 s on one
    core) in a thread, once a slot has stayed idle for ``idle_s``: no trial waits to start and fewer run than ran at
    once (the sweep's tail, or a searcher waiting for results). The import then uses a core no trial wants, and
    the report starts drawing as soon as the last trial ends."""

    def __init__(self, idle_s: float = 2.0):
        self.idle_s, self._most, self._idle_since, self._thread = idle_s, 0, None, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_thread": None, "_idle_since": None}

    def on_step_end(self, iteration, trials, **info):
        if self._thread is not None:
            return
        running = sum(t.status == "RUNNING" for t in trials)
        self._most = max(self._most, running)
        idle = self._most > 1 and running < self._most and not any(t.status == "PENDING" for t in trials)
        if not idle:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = time.monotonic()
        elif time.monotonic() - self._idle_since >= self.idle_s:
            self._thread = threading.Thread(target=_import_report_libraries, name="warm-report", daemon=True)
            self._thread.start()


def _import_report_libraries() -> None:
    import optuna.importance  # noqa: F401  (the fANOVA evaluator imports scikit-learn: most of the time)

    import sweeps.launch.finish  # noqa: F401  (the report and its figures: matplotlib)
