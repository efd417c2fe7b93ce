"""Reading a sweep folder back: failures from error.txt, and trials that never reported."""
from __future__ import annotations

import json

from sweeps.results.collect import collect_records
from sweeps.results.records import error_lines

ERROR_TXT = """Failure # 1 (occurred at 2026-11-23_09-26-14)
ray::ImplicitFunc.train() (pid=5623, ip=192.0.2.2, repr=run_trial)
  File "sweeps/launch/watchdog.py", line 90, in run
    raise TrialStalled(reason)
sweeps.faults.TrialStalled: no report for 5 s after step 2
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


def test_a_trial_stopped_before_its_first_report_keeps_its_own_id(tmp_path):
    """A time budget may end a sweep while a trial still loads its model: it has a folder but no result."""
    for name in ("run_trial_9c18c3c3_1_cell=1,fault=hang_3_2026-11-23_09-41-53", "run_trial_d14ab_00000_0_lr=0.1_2026"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "params.json").write_text(json.dumps({"learning_rate": 0.1}))
    assert [r.trial_id for r in collect_records(tmp_path)] == ["9c18c3c3", "d14ab_00000"]
