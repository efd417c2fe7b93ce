"""Shared fixtures. Tests run the real torch/transformers/peft (and Ray, Optuna, MLflow) on the tiny model."""
from __future__ import annotations

import os
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
