"""sweeps.faults on its own: what counts as a full disk or an unwritable store, writes that leave the last good
file, and the reason of a worker Ray's memory monitor killed (the sweeps themselves are in tests/test_faults.py)."""
from __future__ import annotations

import os
import subprocess

import pytest

from sweeps.faults import HOST_OOM, StorageProblem, as_storage_problem, atomic_write, describe, problem
from sweeps.results.records import error_lines


def test_full_disks_and_read_only_stores_are_recognized_whatever_library_says_it():
    assert problem(OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")) == \
        "no space left on device"  # pyarrow: an errno, no file name
    assert problem(RuntimeError("(sqlite3.OperationalError) database or disk is full")).startswith("no space left")
    assert problem(RuntimeError("(sqlite3.OperationalError) attempt to write a readonly database")) == \
        "the store is read-only"
    wrapped = RuntimeError("Traceback ...\n  File \"/usr/lib/x.py\", line 1\nOSError: [Errno 28] No space left on device")
    assert problem(wrapped) == "no space left on device"
    assert as_storage_problem(wrapped).path is None, "a traceback's source files are not the file that was written"
    assert problem(ValueError("bad value")) is None and problem(OSError(2, "No such file or directory")) is None
    found = as_storage_problem(OSError(28, "No space left on device", "/out/s/run_trial_x/result.json"))
    assert str(found) == "no space left on device: could not write /out/s/run_trial_x/result.json (a trial's results)"
    assert describe("/out/s/mlflow_pending.jsonl") == "the MLflow replay queue"


def test_a_write_that_fills_the_disk_leaves_the_previous_file_whole(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        path = disk / "trials.json"
        atomic_write(path, "[1, 2]")
        with pytest.raises(StorageProblem) as raised:
            atomic_write(path, "x" * (2 << 20))
        assert raised.value.path == str(path) and raised.value.what == "the trial records"
        assert path.read_text() == "[1, 2]" and sorted(p.name for p in disk.iterdir()) == ["trials.json"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_worker_killed_by_rays_memory_monitor_is_one_reason(tmp_path):
    error = tmp_path / "error.txt"
    error.write_text(
        "Failure # 1 (occurred at 2026-12-06_07-10-33)\n"
        "ray.exceptions.RayActorError: OutOfMemoryError: 1 worker(s) were killed due to the node running low on "
        "memory. Memory on the node (IP: 10.0.0.1) was 4.17GB used / 23.54GB limit (0.177119)\n"
        "Top 10 memory users: PID\tMEM(GB)\tCOMMAND\n"
        "Refer to the documentation on how to address the out of memory issue: https://docs.ray.io/...\n"
        "Failure # 2 (occurred at 2026-12-06_07-10-40)\n"
        "torch.OutOfMemoryError: injected out-of-memory at step 2\n")
    assert error_lines(error) == [HOST_OOM, "torch.OutOfMemoryError: injected out-of-memory at step 2"]


def test_sqlites_full_disk_names_the_sweep_folder_and_its_stores(tmp_path):
    """SQLite says "database or disk is full" without a file (seen in CI: the MLflow store filled first)."""
    import sqlite3

    import pytest

    from sweeps.faults import Incomplete, stopped_cleanly

    with pytest.raises(Incomplete) as info, stopped_cleanly("python sweeps/run.py s.yaml --resume", folder=tmp_path):
        raise sqlite3.OperationalError("database or disk is full")
    line = str(info.value)
    assert line.startswith("no space left on device (database or disk is full): could not write " + str(tmp_path))
    assert "(a SQLite store: its Optuna study, or the MLflow store)" in line and line.endswith("s.yaml --resume")
