"""Reading a sweep folder back: failures from error.txt."""
from __future__ import annotations

from sweeps.tracking import error_lines

ERROR_TXT = """Failure # 1 (occurred at 2026-11-23_09-26-14)
ray::ImplicitFunc.train() (pid=5623, ip=192.0.2.2, repr=run_trial)
  File "sweeps/watchdog.py", line 90, in run
    raise TrialStalled(reason)
sweeps.watchdog.TrialStalled: no report for 5 s after step 2
Failure # 2 (occurred at 2026-11-23_09-26-21)
The actor died unexpectedly before finishing this task.
\tclass_name: ImplicitFunc
ray.exceptions.RayActorError: The actor died unexpectedly before finishing this task.
"""


def test_every_failure_in_error_txt_is_one_line_and_a_stall_is_its_bare_reason(tmp_path):
    (tmp_path / "error.txt").write_text(ERROR_TXT)
    assert error_lines(tmp_path / "error.txt") == [
        "no report for 5 s after step 2",
        "ray.exceptions.RayActorError: The actor died unexpectedly before finishing this task.",
    ]
    assert error_lines(tmp_path / "missing.txt") == []

