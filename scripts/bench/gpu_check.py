"""GPU check (BENCHMARKS.md section 7): A, trials packed through Ray Tune; B, real model sizes (memory_estimate)."""
import functools
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: this checkout's packages
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the models are built here

from scripts.bench._harness import Report, cli, entry, fmt, gpus, run_sweep, sh, spread
from scripts.bench.memory_estimate import real_sizes

HEADER_A = ["row", "resources", "runs", "wall s", "trials completed / run", "completed trials/hour", "mean GPU busy %",
            "most trials at once", "GPU share a trial", "largest peak GiB", "its estimate GiB"]
A_OVERRIDES = ["search.refine=null", "space.batch_size=[8]", "tracking.experiment=gpu-check"]  # 12 trials, the same in both rows
A_QUICK = ["space.method=[lora]", "data.train=builtin:facts:8", "train.epochs=1", "train.memorization=false",
           "train.forgetting=false", "train.eval_every=8", "failure.checkpoint_every=0", "tracking.experiment=gpu-check"]
# the rows: name -> (what it asks for, its overrides); packed, and one per GPU (without a GPU: one at a time)
ROWS = {"packed": ("resources: auto", ["resources=auto"]), "one per GPU": ("resources: {gpu: 1}", ["resources={gpu: 1}"]),
        "one at a time": ("max_concurrent 1 (no GPU)", ["resources=auto", "search.max_concurrent=1"])}


def a_sweep(spec: str, tmp: Path, base: list[str], tag: str, overrides: list[str], on_gpu: bool, end: float) -> dict:
    """One sweep command: wall (launch to exit), GPU busy % (the mean of all GPUs, every 0.5 s; none without a GPU), and
    what its trials.json says; completed trials only count."""
    name, out, busy, done = f"gpucheck-{tag}", tmp / "sweeps", [], threading.Event()

    def poll():
        while not done.wait(0.5):
            if sample := sh("nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"):
                busy.append(statistics.mean(float(v) for v in sample.split()))
    if on_gpu:
        threading.Thread(target=poll, daemon=True).start()
    try:
        t = run_sweep(spec, name, out, [*base, *overrides], f"sqlite:///{tmp / 'mlflow.db'}", timeout=max(end - time.time(), 1.0))
    except RuntimeError as exc:
        return {"error": "the sweep failed: " + str(exc).splitlines()[0][:200]}
    finally:
        done.set()
    if t["stopped_early"] or not (out / name / "trials.json").is_file():
        return {"error": "stopped by --budget-s" if t["stopped_early"] else "no trials.json"}
    finals = [r.get("final") or {} for r in json.loads((out / name / "trials.json").read_text())]
    completed = sum(f.get("status") == "completed" for f in finals)
    peaks = [(f["peak_mem_gib"], f.get("mem_estimate_gib")) for f in finals if f.get("peak_mem_gib") is not None]
    spans = [(f["start_unix"], f["end_unix"]) for f in finals if f.get("start_unix") and f.get("end_unix")]
    most = max((sum(a <= s < b for a, b in spans) for s, _ in spans), default=0)  # the most running as one starts
    return {"wall_s": t["wall_s"], "trials": len(finals), "completed": completed, "per_hour": completed * 3600 / t["wall_s"],
            "gpu_busy": statistics.mean(busy) if busy else None, "at_once": most or None,
            "shares": sorted({f["gpu_share"] for f in finals if f.get("gpu_share")}),
            "peak_gib": max(peaks)[0] if peaks else None, "estimate_gib": max(peaks)[1] if peaks else None}


def part_a(args, rep: Report, on_gpu: bool, end: float) -> dict:
    rep("", f"## Part A: packing through Ray Tune ({Path(args.spec).name})", "")
    if missing := [m for m in ("ray", "optuna", "mlflow") if importlib.util.find_spec(m) is None]:
        rep(f"not run: {', '.join(missing)} not importable here (see scripts/device_wheels.sh)")
        return {"skipped": missing}
    base = (A_QUICK if args.quick else A_OVERRIDES) + args.override
    rows = {r: ROWS[r] for r in ("packed", "one per GPU" if on_gpu else "one at a time")}
    rep(f"overrides on both rows: `{' '.join(base)}`; " + "; ".join(f"{r} = `{' '.join(ov)}`" for r, (_, ov) in rows.items()))
    runs, rng, last = [], random.Random(args.seed), 0.0
    with tempfile.TemporaryDirectory(prefix="gpu-check-a-") as tmp_name:
        tmp = Path(tmp_name)
        sweep = functools.partial(a_sweep, args.spec, tmp, base, on_gpu=on_gpu, end=end)
        if args.warmup:  # model cache, the base model's cached evaluation, imports: discarded
            warm = sweep("warmup", ["resources=auto", "space.method=[lora]"])
            rep("warm-up (discarded): " + (warm.get("error") or f"{warm['wall_s']:.1f} s"))
        for repeat in range(1, args.repeats + 1):
            if last and end - time.time() < 1.1 * last:
                rep(f"repeats stopped after {repeat - 1}: the next would not end within --budget-s")
                break
            t0, order = time.time(), list(rows)
            rng.shuffle(order)
            for row in order:
                runs.append(r := {"repeat": repeat, "row": row, **sweep(f"{row[:3]}-{repeat}", rows[row][1])})
                rep(f"repeat {repeat}, {row}: " + (r["error"] if "error" in r else f"{r['wall_s']:.1f} s, {r['completed']} of "
                                                   f"{r['trials']} completed, GPU busy {fmt(r['gpu_busy'], 0)}%"))
            last = time.time() - t0
    rep("")
    ok = {(r["repeat"], r["row"]): r for r in runs if "error" not in r}
    table, per_hour = [], {}
    for row, (asks, _) in rows.items():
        done = [r for (_, of), r in ok.items() if of == row]
        col = lambda key, digits=1, done=done: spread([r[key] for r in done], digits)  # noqa: E731
        per_hour[row] = [r["per_hour"] for r in done]
        at_once = sorted({r["at_once"] for r in done if r["at_once"]}) or ["n/a"]
        table.append([row, asks, len(done), col("wall_s"), f"{min((r['completed'] for r in done), default=0)} of "
                      f"{max((r['trials'] for r in done), default=0)}", col("per_hour", 0), col("gpu_busy", 0),
                      "-".join(map(str, sorted({at_once[0], at_once[-1]}))),
                      ", ".join(f"{x:g}" for x in sorted({x for r in done for x in r["shares"]})) or "-",
                      col("peak_gib", 2), col("estimate_gib", 2)])
    rep.table(HEADER_A, table, "median (min-max) over the repeats:")
    first, second = rows
    if pairs := [ok[k, first]["per_hour"] / ok[k, second]["per_hour"] for k, row in ok if row == first and (k, second) in ok]:
        ratio = statistics.median(per_hour[first]) / statistics.median(per_hour[second])
        rep(f"{first} / {second}, completed trials per hour: **{ratio:.2f}x** (per repeat {min(pairs):.2f}x-{max(pairs):.2f}x)")
    return {"runs": runs, "overrides": base}


def main(argv: list[str] | None = None) -> None:
    quick = dict(spec="search_spaces/smoke.yaml", repeats=1, warmup=False, batch_size=2, seq_len=128, steps=2)
    args, rep = cli(__doc__, __file__, argv, quick, part=("both", "a", "b"), budget_s=0.0, override=[], warmup=True,
                    spec="search_spaces/lr.yaml", repeats=3, seed=0, models="llama-3.2-1b,llama-3.1-8b", batch_size=2,
                    seq_len=2048, steps=6)  # part: a, b or both (B first); budget_s: no step starts that would not end
    on_gpu, end = bool(gpus()) and not args.quick, time.time() + (args.budget_s or 1e9)
    results = {"b": real_sizes(args, rep, on_gpu, end)} if args.part in ("b", "both") else {}
    if args.part in ("a", "both"):
        results["a"] = part_a(args, rep, on_gpu, end)
    rep.save(results)


if __name__ == "__main__":
    entry(main, globals())
