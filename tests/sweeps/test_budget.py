"""The time budget on its own (no Ray): it interrupts the block the way fit() listens for, once, and only when due."""
from __future__ import annotations

import signal
import time

from sweeps.launch.budget import TimeBudget


def _fit(seconds: float) -> list[float]:
    """Stand-in for tuner.fit(): listens for SIGUSR1 as Ray Tune does, until interrupted or ``seconds`` pass."""
    interrupts: list[float] = []
    signal.signal(signal.SIGUSR1, lambda *_: interrupts.append(time.monotonic()))
    end = time.monotonic() + seconds
    while not interrupts and time.monotonic() < end:
        time.sleep(0.02)
    return interrupts


def test_a_spent_budget_interrupts_fit_once():
    t0 = time.monotonic()
    with TimeBudget(0.3) as budget:
        interrupts = _fit(5)
    assert budget.expired and len(interrupts) == 1
    assert 0.3 <= interrupts[0] - t0 < 2


def test_a_budget_that_fit_outlasts_is_not_spent_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGUSR1)
    with TimeBudget(5) as budget:
        interrupts = _fit(0.1)
    assert not budget.expired and not interrupts
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_budget_spent_before_fit_listens_waits_for_it():
    """Spent during start-up, the signal is held back (not lost, and not SIGUSR1's default: kill) until fit listens."""
    with TimeBudget(0.05) as budget:
        time.sleep(0.3)  # building the Tuner
        interrupts = _fit(3)
    assert budget.expired and len(interrupts) == 1
