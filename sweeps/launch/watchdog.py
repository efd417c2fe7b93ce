"""The stall watchdog: a trial that stops reporting is failed, so that Ray retries it.

    watchdog = Watchdog(stall_s=300, setup_s=1800)
    watchdog.run(lambda: train(cfg, report))        # report() wraps each tune.report in watchdog.reporting(step)

A hung trial (a dead data loader, a deadlocked collective, stuck I/O) holds its
slot and the sweep never ends. ``run`` starts the training in a daemon thread
and watches it from the calling thread, which Ray runs the trial function in:
when no report came for ``stall_s`` it raises ``TrialStalled`` there. Ray then
records the trial as errored and retries it under ``FailureConfig`` from its
last checkpoint; the errored actor is not reused, so its process, and the hung
thread with it, ends. A stop decided on the driver (a Stopper) would not be
retried, and an exception cannot be raised inside a thread blocked in C code.

Time spent inside a report (waiting for the driver, persisting a checkpoint)
does not count: a slow driver is not a stalled trainer. Each attempt's first
report gets ``setup_s`` more, for loading the model and the base evaluation.
This module imports neither ray nor torch, so it is tested on its own.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sweeps.faults import TrialStalled


class Watchdog:
    def __init__(self, stall_s: float, setup_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.stall_s, self.setup_s, self._clock = stall_s, setup_s, clock
        self._lock = threading.Lock()
        self._since = clock()
        self._step: Any = None  # the step of the last report; None before the first
        self._reporting = False
        self.abandoned = False  # set once the stall is declared: a trainer that wakes up must not report

    @contextmanager
    def reporting(self, step: Any) -> Iterator[None]:
        """Wrap one report: the clock stops inside it and restarts, for ``stall_s``, when it returns."""
        with self._lock:
            if self.abandoned:
                raise TrialStalled("this attempt was given up as stalled")
            self._reporting = True
        try:
            yield
        finally:
            with self._lock:
                self._reporting, self._since, self._step = False, self._clock(), step

    def overdue(self) -> str | None:
        """The stall reason once the trainer is overdue (and from then on the attempt is abandoned), else None."""
        with self._lock:
            limit = self.stall_s if self._step is not None else self.stall_s + self.setup_s
            if self.abandoned or self._reporting or self._clock() - self._since < limit:
                return None
            self.abandoned = True
            after = f"step {self._step}" if self._step is not None else "the start (model load included)"
            return f"no report for {limit:g} s after {after}"

    def run(self, work: Callable[[], None], on_stall: Callable[[str], None] | None = None) -> None:
        """Run ``work`` in a daemon thread; return or raise as it does, or raise TrialStalled when it stalls.

        ``on_stall(reason)`` is called first, from this thread, to tell the driver why.
        """
        failure: list[BaseException] = []

        def target() -> None:
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - handed to the watching thread, SystemExit included
                failure.append(exc)

        worker = threading.Thread(target=target, name="trainer", daemon=True)
        worker.start()
        poll = min(1.0, self.stall_s / 4)
        while True:
            worker.join(poll)
            if not worker.is_alive():
                break
            reason = self.overdue()
            if reason is not None:
                if on_stall is not None:
                    on_stall(reason)
                raise TrialStalled(reason)
        if failure:
            raise failure[0]
