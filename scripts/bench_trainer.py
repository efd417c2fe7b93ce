"""Tokens/s of this project's trainer against Hugging Face Trainer, per method.

A thin entry point under the name the trainer issue uses; the benchmark itself
(flags, method, output) is scripts/bench/trainer_throughput.py.

    python scripts/bench_trainer.py            # SmolLM2-135M, full/lora/last_layer, 3 reps
    python scripts/bench_trainer.py --quick    # tiny model, a smoke run
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    spec = importlib.util.spec_from_file_location("trainer_throughput", _ROOT / "scripts" / "bench" / "trainer_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


if __name__ == "__main__":
    sys.path[0] = str(_ROOT)  # import this checkout's packages, as the benchmark's own subprocesses do
    sys.exit(main())
