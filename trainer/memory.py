"""Memory: the measured peak of a run, and (``estimate``) what a run will need before it starts.

The peak is the CUDA caching allocator's peak of allocated tensor memory on a GPU (``max_memory_allocated``, what a
memory cap limits), and the process's peak resident set (``VmHWM``, reset at the start of each run) on a CPU,
which includes the Python runtime and its libraries.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

GIB = 1024**3


def reset_peak(device: torch.device) -> None:
    """Start measuring this run's peak (a Ray worker runs many trials in one process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux >= 4.0: "5" resets the peak resident set of this process
            Path("/proc/self/clear_refs").write_text("5")


def peak_gib(device: torch.device) -> float | None:
    """The peak since ``reset_peak``, in GiB (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None
