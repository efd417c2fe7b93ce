"""Packing LoRA trials on one GPU: trials per hour with 1, 2 or 4 trials sharing the device.

    python scripts/bench/gpu_packing.py --model smollm2-135m --steps 200    # on a CUDA machine
    python scripts/bench/gpu_packing.py --quick       # tiny model on the CPU, 1 and 2 trials: keeps it from rotting

Ray's fractional ``gpu: 0.5`` or ``0.25`` only lets 2 or 4 trial processes share one
GPU (scheduling accounting, not isolation); this measures what that sharing buys,
with the same trainer processes Ray would start, and samples GPU utilization
with nvidia-smi while they run. Needs a CUDA GPU (``--quick`` runs the same code on the CPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])

_TRIAL = """
import sys, json, time
from trainer.config import TrainConfig
from trainer.loop import train
from trainer.quiet import quiet_libraries
quiet_libraries()
cfg = TrainConfig(model=sys.argv[1], method=sys.argv[2], learning_rate=1e-3, batch_size=int(sys.argv[4]),
                  max_steps=int(sys.argv[3]), seq_len=48, report_every=int(sys.argv[4]), eval_every=None,
                  memorization=False, forgetting=False, weight_change=False, device=sys.argv[6], dtype=sys.argv[5],
                  train_data="builtin:facts:128", eval_data="builtin:facts-heldout:16")
t = time.perf_counter(); r = train(cfg)
print(json.dumps({"wall": time.perf_counter() - t, "train": r.metrics["train_time_s"], "status": r.status}))
"""


def _sample_util(stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=5).stdout.strip().split(",")
            out.append((float(q[0]), float(q[1])))
        except Exception:
            pass
        stop.wait(0.5)


def run_packed(n: int, args) -> dict:
    util: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_util, args=(stop, util), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", _TRIAL, args.model, args.method, str(args.steps), str(args.batch_size),
                               args.dtype, args.device], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
             for _ in range(n)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    busy = [u for u, _ in util]
    return {"trials": n, "wall_s": wall, "trials_per_hour": n * 3600 / wall,
            "mean_trial_train_s": statistics.mean(r["train"] for r in results),
            "gpu_util_mean": statistics.mean(busy) if busy else None, "gpu_mem_max_mb": max((m for _, m in util), default=None)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a preset (smollm2-135m, tiny) or a local HF directory")
    p.add_argument("--device", default="cuda")
    p.add_argument("--method", default="lora")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--packing", default="1,2,4")
    p.add_argument("--quick", action="store_true", help="tiny model, CPU, float32, 4 steps, packing 1,2")
    p.add_argument("--json", metavar="OUT", help="also write every row here")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.device, args.dtype, args.steps, args.batch_size, args.packing = "tiny", "cpu", "float32", 4, 4, "1,2"
    rows = [run_packed(int(n), args) for n in args.packing.split(",")]
    base = rows[0]["trials_per_hour"]
    print(f"{args.method} trials of {args.steps} steps x batch {args.batch_size}, {args.dtype}, model {args.model}, "
          f"device {args.device}{' (--quick: a smoke run, not a measurement)' if args.quick else ''}")
    print("| trials sharing the GPU | wall s | trials/hour | vs 1 | mean GPU util % | max GPU mem MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        util = "-" if r["gpu_util_mean"] is None else f"{r['gpu_util_mean']:.0f}"  # no nvidia-smi: on the CPU
        mem = "-" if r["gpu_mem_max_mb"] is None else f"{r['gpu_mem_max_mb']:.0f}"
        print(f"| {r['trials']} | {r['wall_s']:.1f} | {r['trials_per_hour']:.0f} | {r['trials_per_hour'] / base:.2f}x | "
              f"{util} | {mem} |")
    # wall includes each trial's process start, model load and evals; this is the part inside optimizer steps
    print("mean seconds inside optimizer steps per trial: "
          + ", ".join(f"{r['trials']} sharing -> {r['mean_trial_train_s']:.1f}" for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv, "steps": args.steps,
                                               "batch_size": args.batch_size, "dtype": args.dtype, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
