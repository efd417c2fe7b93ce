"""Faults of the machine a sweep runs on: a full disk, a store that cannot be written, the host out of memory.

None of them is the user's input (exit 2) nor a bug (a traceback): the sweep stops, or the one trial fails,
with one line that says what happened, and ``--resume`` carries on once it is fixed. This module recognizes
them in exceptions and log records, writes the sweep folder's own files so that a failure leaves the last
good copy (``atomic_write``), and serializes the creation of a shared SQLite MLflow store (``store_lock``).
It imports neither Ray, Optuna, MLflow nor torch.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trainer.errors import UserError

# ray is imported only where a Ray error is recognized: a sweep's folder is written and read without it

HOST_OOM = "host out of memory (Ray's memory monitor)"
"""The reason of a trial whose worker Ray's memory monitor killed (the host ran short, not the trial's device)."""
# Ray's memory monitor, in the error of the task or actor it killed (ray.exceptions.OutOfMemoryError)
_HOST_OOM = re.compile(r"node running low on memory|NODE_OUT_OF_MEMORY|OutOfMemoryError: \d+ worker\(s\) were killed")



class TrialStalled(Exception):
    """The trainer sent no report for too long (the stall watchdog, ``sweeps.launch.watchdog``, raises it); the
    message is the reason recorded for the trial, which ``sweeps.results.records`` reads back from error.txt."""


_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}
_WORDS = [  # what libraries say when they do not hand the errno on: pyarrow, SQLite (through SQLAlchemy)
    (re.compile(r"No space left on device|errno 28\b", re.I), "no space left on device"),
    (re.compile(r"Disk quota exceeded", re.I), "disk quota exceeded"),
    (re.compile(r"database or disk is full", re.I), "no space left on device (database or disk is full)"),
    (re.compile(r"Read-only file system", re.I), "read-only file system"),
    (re.compile(r"attempt to write a readonly database", re.I), "the store is read-only"),
]
_WHAT = [  # a file of a sweep folder, in words
    ("result.json", "a trial's results"), ("params.json", "a trial's settings"), ("checkpoint_", "a trial checkpoint"),
    ("trials.json", "the trial records"), ("mlflow_pending.jsonl", "the MLflow replay queue"),
    ("mlflow.json", "the trial -> MLflow run map"), ("stops.jsonl", "the stop reasons"), ("optuna.db", "the Optuna study"),
    ("mlflow.db", "the MLflow store"), ("experiment_state", "Ray's sweep state"), ("searcher-state", "Ray's sweep state"),
    ("tuner.pkl", "Ray's sweep state"), ("report", "the report"), ("mlartifacts", "an MLflow artifact"),
]


class Incomplete(UserError):
    """The sweep did not finish what it had to write (a full disk, a store it cannot write): exit code 3, one line,
    and ``--resume`` completes it once the cause is fixed."""

    exit_code = 3


class StorageProblem(OSError):
    """A write that failed for lack of space or permission: ``path`` and ``what`` (the file, in words)."""

    def __init__(self, why: str, path: str | Path | None, what: str | None = None):
        super().__init__(why)
        self.why, self.path = why, str(path) if path else None
        self.what = what or describe(self.path)

    def __str__(self) -> str:
        where = f" {self.path}" if self.path else ""
        return f"{self.why}: could not write{where} ({self.what})"


def problem(exc: BaseException | None) -> str | None:
    """What made ``exc`` (or an exception in its chain) fail, if it is a full disk or a store it may not write."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, StorageProblem):
            return exc.why
        if isinstance(exc, OSError) and exc.errno in _ERRNOS:
            return _ERRNOS[exc.errno]
        why = problem_in(str(exc))
        if why:
            return why
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def problem_in(text: str) -> str | None:
    """The same, from an error's text (a trial's error.txt, a log line)."""
    for pattern, words in _WORDS:
        if pattern.search(text or ""):
            return words
    return None


def as_storage_problem(exc: BaseException, default_path: str | Path | None = None) -> StorageProblem | None:
    """``exc`` as a StorageProblem naming the file (its own, or the deepest one in its chain), or None."""
    why = problem(exc)
    if why is None:
        return None
    path, cur, seen = None, exc, 0
    while cur is not None and seen < 10:
        if isinstance(cur, StorageProblem):
            return cur
        path = path or getattr(cur, "filename", None) or _path_in(str(cur))
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return StorageProblem(why, path or default_path)


def _path_in(text: str) -> str | None:
    """A file path in an error's message (its last line: not a traceback's source files)."""
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    match = re.search(r"'(/[^']+)'|\"(/[^\"]+)\"|(?<![\w/])(/(?:[\w.+=,@-]+/)+[\w.+=,@-]+)", text)
    return next((g for g in match.groups() if g), None) if match else None


def describe(path: str | Path | None) -> str:
    """A sweep folder's file in words (``result.json`` -> "a trial's results")."""
    text = str(path or "")
    for key, words in _WHAT:
        if key in text:
            return words
    return "a file of the sweep"


def is_host_oom(text: str) -> bool:
    return bool(_HOST_OOM.search(text or ""))


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a failure (a full disk) leaves the previous
    version whole, never a half-written file that a resume would trust. Raises StorageProblem naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        why = problem(exc)
        if why:
            raise StorageProblem(why, path) from exc
        raise


def append_line(path: str | Path, line: str) -> None:
    """Append one line (a result, a stop reason); a full disk is a StorageProblem naming ``path``."""
    try:
        with open(path, "a") as handle:
            handle.write(line if line.endswith("\n") else line + "\n")
            handle.flush()
    except OSError as exc:
        why = problem(exc)
        if why:
            raise StorageProblem(why, path) from exc
        raise


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///...`` URI (absolute or relative to the current folder); None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?")[0])


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock (fcntl, ``<store>.lock`` beside it) while a SQLite store is created or upgraded.

    MLflow builds a new store's schema in the first process that opens it; two sweeps started at once on one new
    store both did, and one failed (``table ... already exists``). Other stores need no lock."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def stopped_cleanly(resume: str, folder: str | Path | None = None) -> Iterator[None]:
    """Turn a full disk, an unwritable store or the host out of memory, wherever it surfaces in a sweep, into
    ``Incomplete``: one line that names what could not be written, and the command that continues the sweep.

    SQLite's "database or disk is full" names no file: it is then the sweep ``folder``'s Optuna study or an MLflow
    SQLite store, and the line says so."""
    try:
        yield
    except Incomplete:
        raise
    except Exception as exc:
        found = as_storage_problem(exc)
        if found is not None and found.path is None and folder is not None:
            what = ("a SQLite store: its Optuna study, or the MLflow store" if "database" in found.why
                    else "a file of the sweep")
            found = StorageProblem(found.why, folder, what)
        if found is not None:
            raise Incomplete(f"{found}; the sweep stopped there. Free space (or make it writable), then continue "
                             f"it with: {resume}") from None
        if is_host_oom(f"{type(exc).__name__}: {exc}"):
            raise Incomplete(f"{HOST_OOM} stopped the sweep. Once memory is free, continue it with: {resume}") from None
        raise


def survive_memory_monitor() -> None:
    """Let a trial whose worker Ray's memory monitor killed fail like any dead worker, instead of ending the sweep.

    Ray 2.60's actor manager (``RayActorManager._actor_task_failed``) raises on an actor task that ended in
    ``OutOfMemoryError``, which is neither the ``RayActorError`` nor the ``RayTaskError`` it expects, and that
    ends ``Tuner.fit`` with a traceback. The worker is dead (killed), so the error is handed on as the actor's
    death, as Ray itself does when the kill comes while the actor starts: Tune fails the trial (retried under
    ``failure.max_retries``) with the monitor's message, which ``sweeps.results.records`` reads as ``HOST_OOM``."""
    from ray.air.execution._internal import actor_manager
    from ray.exceptions import OutOfMemoryError, RayActorError

    original = actor_manager.RayActorManager._actor_task_failed
    if getattr(original, "survives_memory_monitor", False):
        return

    def _actor_task_failed(self, tracked_actor_task, exception):
        if isinstance(exception, OutOfMemoryError):
            exception = RayActorError(error_msg=f"OutOfMemoryError: {exception}")
        return original(self, tracked_actor_task, exception)

    _actor_task_failed.survives_memory_monitor = True
    actor_manager.RayActorManager._actor_task_failed = _actor_task_failed


class StorageLogFilter(logging.Filter):
    """On a library's log handlers: a record about a full disk or an unwritable store is not printed (no
    traceback); the first is kept in ``seen`` for the sweep to stop with one line."""

    def __init__(self):
        super().__init__()
        self.seen: StorageProblem | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info and record.exc_info[1] is not None else None
        found = as_storage_problem(exc) if exc is not None else None
        if found is None and problem_in(record.getMessage()):
            found = StorageProblem(problem_in(record.getMessage()), _path_in(record.getMessage()))
        if found is None:
            return True
        self.seen = self.seen or found
        return False

    def install(self) -> StorageLogFilter:
        """On every handler of the root logger and of the libraries that print through their own."""
        for name in ("", "ray", "ray.tune", "ray.train", "optuna", "mlflow", "sqlalchemy", "alembic"):
            for handler in logging.getLogger(name).handlers:
                if self not in handler.filters:
                    handler.addFilter(self)
        return self


LOG_FILTER = StorageLogFilter()
"""The driver's one filter: installed on the log handlers when a sweep starts, read by ``sweeps.launch.folder``."""
