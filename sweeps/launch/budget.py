"""The sweep's time budget: once it is spent, ``tuner.fit()`` ends the way Ctrl-C ends it, so --resume continues.

    with TimeBudget(spec.search.time_budget_s) as budget:
        tuner.fit()
    if budget.expired: ...

Ray Tune's own ``TuneConfig(time_budget_s=...)`` is not used. Its TimeoutStopper
stops every running trial as TERMINATED and marks the searcher finished, so Ray
counts those trials as done and ``Tuner.restore`` never runs them again; and the
spent budget is pickled with the experiment, so a restored run stops at once
(ray-project/ray#19240, #21038). An interrupt instead saves the running trials
as still running: the report records them unfinished, and ``Tuner.restore``
resumes them from their checkpoints. ``fit()`` treats SIGUSR1 as it treats
SIGINT and always listens for it (a user may switch its SIGINT handler off), so
the budget sends SIGUSR1 to this process.
"""
from __future__ import annotations

import os
import signal
import threading


class TimeBudget:
    """Send SIGUSR1 to this process ``seconds`` after entering the block, unless it has been left by then."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.expired = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous = None

    def __enter__(self) -> TimeBudget:
        if self.seconds is None:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("a sweep with a time budget must run in the main thread: it ends through a signal")
        self._previous = signal.signal(signal.SIGUSR1, _not_listening)
        self._thread = threading.Thread(target=self._watch, name="time-budget", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._done.set()
        self._thread.join()
        signal.signal(signal.SIGUSR1, self._previous if self._previous is not None else signal.SIG_DFL)

    def _watch(self) -> None:
        if self._done.wait(self.seconds):
            return
        self.expired = True
        # Before fit() has put its own handler in place the signal would be lost: wait until it has.
        while signal.getsignal(signal.SIGUSR1) is _not_listening:
            if self._done.wait(0.2):
                return
        os.kill(os.getpid(), signal.SIGUSR1)


def _not_listening(signum, frame) -> None:
    """SIGUSR1 while fit() does not listen: ignored (its default action would kill the sweep)."""
