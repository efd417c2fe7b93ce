"""The stall watchdog on its own (no Ray): it fails a silent trainer, and only a silent one."""
from __future__ import annotations

import threading
import time

import pytest

from sweeps.launch.watchdog import TrialStalled, Watchdog


def _reports_then_hangs(watchdog: Watchdog, steps: int, release: threading.Event):
    def work():
        for step in range(1, steps + 1):
            with watchdog.reporting(step):
                pass
        release.wait()  # a hang: alive, silent

    return work


def test_a_trainer_silent_past_stall_s_fails_with_the_step_it_stopped_after():
    release = threading.Event()
    stalls = []
    watchdog = Watchdog(stall_s=0.3, setup_s=5)
    t0 = time.monotonic()
    with pytest.raises(TrialStalled, match=r"^no report for 0.3 s after step 2$"):
        watchdog.run(_reports_then_hangs(watchdog, 2, release), on_stall=stalls.append)
    release.set()
    assert stalls == ["no report for 0.3 s after step 2"], "the driver is told the reason before the trial fails"
    assert time.monotonic() - t0 < 3


def test_a_trainer_that_wakes_up_after_the_stall_may_not_report():
    watchdog = Watchdog(stall_s=0.2)
    with watchdog.reporting(1):
        pass
    time.sleep(0.3)
    assert watchdog.overdue() is not None
    with pytest.raises(TrialStalled):
        with watchdog.reporting(2):
            pass


def test_time_inside_a_report_does_not_count():
    watchdog = Watchdog(stall_s=0.2)

    def work():
        for step in (1, 2):
            with watchdog.reporting(step):
                time.sleep(0.6)  # the driver is slow to ask for the next result

    watchdog.run(work)


def test_the_first_report_gets_setup_s_more():
    watchdog = Watchdog(stall_s=0.2, setup_s=0.6)
    watchdog.run(lambda: time.sleep(0.5))  # loading the model: 0.5 s < 0.2 + 0.6 s
    late = Watchdog(stall_s=0.2, setup_s=0.1)
    release = threading.Event()
    with pytest.raises(TrialStalled, match=r"^no report for 0.3 s after the start"):
        late.run(lambda: release.wait())
    release.set()


@pytest.mark.parametrize("exc", [ValueError("bad batch"), SystemExit(0)], ids=["error", "ray-stop"])
def test_the_trainers_own_exit_passes_through(exc):
    """An error keeps its type; SystemExit(0) is how Ray stops a trial inside its report, and must stay one."""

    def work():
        raise exc

    with pytest.raises(type(exc)):
        Watchdog(stall_s=5).run(work)
