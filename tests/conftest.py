"""Shared fixtures. Tests run the real torch/transformers/peft (and Ray, Optuna, MLflow) on the tiny model."""
from __future__ import annotations

import math
import os
import re
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny preset, built once per machine (it needs the smollm2 tokenizer, converted once too)."""
    from trainer.models import ensure_preset

    return ensure_preset("tiny")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared 2-core
    machine two threads spin-wait, and make generate() about 7x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from trainer.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def run_cli(args: list[str], cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """Run a project command as a user would; returns the CompletedProcess.

    The command imports this checkout's packages (PYTHONPATH), also where the venv's editable install is another one.
    """
    import subprocess

    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full_env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def ray_node(args: list[str], temp_dir: Path, env: dict) -> None:
    """`ray start ARGS` (1 CPU unless ARGS say otherwise) under TEMP_DIR; stop it with ``stop_ray_nodes_under``."""
    import subprocess

    cpus = [] if any(a.startswith("--num-cpus") for a in args) else ["--num-cpus=1"]
    proc = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", *args, *cpus, f"--temp-dir={temp_dir}",
                           "--disable-usage-stats"], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def stop_ray_nodes_under(temp_dir: Path) -> None:
    """Kill only the Ray processes of this test's cluster (their command lines name its temp dir)."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(temp_dir) in cmdline:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def table(text: str, header: str) -> list[dict[str, str]]:
    """The rows of the Markdown table a command printed under the line that starts with ``header``: {column: cell}."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    assert start is not None, f"no table {header!r} in:\n{text[-3000:]}"

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip()[1:-1].split("|")]

    columns, rows = cells(lines[start]), []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(columns, cells(line))))
    assert rows, f"table {header!r} has no rows"
    return rows


def number(cell: str) -> float:
    """The first number in a table cell, which must be finite: '1,000' 1000, '1.06x' 1.06, '17% (target >= 30%)' 17."""
    match = re.search(r"-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?", cell)
    assert match, f"no number in {cell!r}"
    value = float(match.group().replace(",", ""))
    assert math.isfinite(value), cell
    return value
