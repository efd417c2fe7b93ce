"""Learning-rate range test: find each method's LR bounds before a sweep, and seed its grid with them.

    finetune lr-find search_spaces/lr.yaml
    finetune lr-find search_spaces/lr.yaml --best full=1e-3,lora=1e-2,last_layer=1e-2
    finetune lr-find search_spaces/lr.yaml --methods full,lora --write search_spaces/lr_found.yaml

One short run per method with the LR ramped exponentially from --start to --end, --per-decade steps a
decade (Smith 2015; fastai's lr_find, Lightning's finder). It stops by itself once the smoothed loss
passes 4x its minimum. The rule (``sweeps.results.lr_range``): smooth over half a decade, skip the start-up
stretch, propose a decade either side of the smoothed minimum. The upper bound may lie past where the
ramp's loss blew up (the "diverged" column): by then the ramp has trained several epochs, the sweep's
shorter trials diverge higher, and the sweep needs LRs past its edge to find it. Why that rule, and not
the steepest descent or fastai's valley, is in that module's docstring.

Prints a table and the ``space.learning_rate`` block (per_method bounds) to paste into a sweep spec;
writes it to OUT/learning_rate.yaml with the plot (lr_find.png) and the curves (lr_find.json);
--write makes a whole new spec with it. --best checks the proposal against LRs known to be best
(a sweep's map): each must lie inside its method's bounds.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import yaml

from sweeps.results.lr_range import STOP_FACTOR, beta_for, smoothed, suggest
from sweeps.spec import load_spec
from trainer.config import TrainConfig
from trainer.errors import UserError, cli_errors
from trainer.methods import METHODS
from trainer.quiet import quiet_libraries
from trainer.yamlio import safe_load


def range_test(base: dict, method: str, *, start: float, end: float, steps: int) -> dict:
    """One ramped run; returns the curve (the LR each step trained at, its loss) and how it ended."""
    from trainer.loop import train  # torch: --help and a bad spec answer without it

    beta = beta_for((steps - 1) / math.log10(end / start))  # the trainer's stop smooths as the suggestion does
    cfg = TrainConfig.model_validate({
        **base, "method": method, "scheduler": "exponential", "lr_start": start, "learning_rate": end,
        "max_steps": steps, "stop_factor": STOP_FACTOR, "ema_beta": beta, "warmup_ratio": 0.0, "eval_every": None,
        "memorization": False, "forgetting": False, "weight_change": False,
        "report_every": base.get("batch_size", 4) * base.get("grad_accum", 1), "output_dir": None, "save_model": False,
    })
    curve: dict[int, tuple[float, float]] = {}

    def report(m, checkpoint=None):
        if m.get("train_loss") is not None:  # step k trains at start * (end/start)^((k-1)/(steps-1))
            curve[m["step"]] = (start * (end / start) ** ((m["step"] - 1) / max(steps - 1, 1)), m["train_loss"])

    t0 = time.perf_counter()
    result = train(cfg, report)
    return {"method": method, "curve": [curve[k] for k in sorted(curve)], "status": result.status,
            "reason": result.reason, "steps": result.metrics["step"], "seconds": round(time.perf_counter() - t0, 1)}


def plot(results: list[dict], out: Path, best: dict[str, float]) -> Path:
    import matplotlib  # only when the plot is drawn: the range test itself needs none of it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    bars = ax.get_xaxis_transform()  # x in data, y in axes fraction: the bounds as bars along the bottom
    for k, res in enumerate(results):
        sug, (lrs, losses) = res["suggestions"], zip(*res["curve"])
        at, values = zip(*res["smoothed"])
        line, = ax.plot(lrs, losses, alpha=0.2)
        color, read = line.get_color(), [i for i, lr in enumerate(at) if lr >= sug["skip"]]
        ax.plot(at[: read[0] + 1], values[: read[0] + 1], color=color, lw=1, ls=":")
        ax.plot([at[i] for i in read], [values[i] for i in read], color=color, lw=2,
                label=f"{res['method']}: {sug['low']:.1e} .. {sug['high']:.1e}")
        for key, marker in (("steepest", "v"), ("min_loss", "o"), ("diverge", "x")):
            if sug.get(key):
                i = min(range(len(at)), key=lambda j: abs(math.log(at[j] / sug[key])))
                ax.plot(at[i], values[i], marker, color=color, ms=9)
        y = 0.04 + 0.05 * k
        ax.plot([sug["low"], sug["high"]], [y, y], color=color, lw=5, alpha=0.6, transform=bars, solid_capstyle="butt")
        if res["method"] in best:
            ax.plot(best[res["method"]], y, "*", color="black", ms=11, transform=bars)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate (ramped)")
    ax.set_ylabel("train loss (faint: each step; bold: smoothed)")
    ax.set_title("LR range test: v steepest descent, o minimum, x diverged\n"
                 "bars: proposed bounds" + (", * the sweep's best LR" if best else "") + "; dotted: start-up, skipped",
                 fontsize=10)
    ax.legend(title="method: proposed bounds")
    ax.grid(alpha=0.25)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def lr_block(results: list[dict], grid: int) -> dict:
    """``space.learning_rate`` with each method's proposed bounds (2 significant digits)."""
    return {"log": True, "grid": grid, "per_method": {
        r["method"]: {"low": float(f"{r['suggestions']['low']:.2g}"), "high": float(f"{r['suggestions']['high']:.2g}"),
                      "log": True} for r in results}}


def write_spec(spec_path: Path, results: list[dict], target: Path) -> Path:
    data = safe_load(spec_path.read_text())
    space = data.setdefault("space", {})
    old = space.get("learning_rate") if isinstance(space.get("learning_rate"), dict) else {}
    space["learning_rate"] = lr_block(results, old.get("grid", 6))
    data["name"] = f"{data.get('name', 'sweep')}-lrfind"
    header = f"# python sweeps/run.py {target}\n# LR bounds from: finetune lr-find {spec_path}\n"
    target.write_text(header + yaml.safe_dump(data, sort_keys=False))
    load_spec(target)  # a spec we cannot load again is a bug here, not a user error
    return target


def parse_best(text: str | None, methods) -> dict[str, float]:
    best = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        try:
            best[name.strip()] = float(value)
        except ValueError:
            best[name.strip()] = math.nan
        if name.strip() not in methods or not best[name.strip()] > 0:
            raise UserError(f"--best: expected method=LR pairs for {', '.join(methods)} (e.g. full=1e-3), got {item!r}")
    return best


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune lr-find", description="LR range test per method.")
    parser.add_argument("spec")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--methods", help="comma-separated (default: the spec's methods)")
    parser.add_argument("--start", type=float, default=1e-6, help="first LR of the ramp (default 1e-6)")
    parser.add_argument("--end", type=float, default=1.0, help="last LR; the run stops once the loss blows up")
    parser.add_argument("--per-decade", type=float, default=12, help="steps per decade of LR (default 12)")
    parser.add_argument("--steps", type=int, help="steps over the whole ramp (overrides --per-decade)")
    parser.add_argument("--best", help="LRs known to be best, e.g. full=1e-3,lora=1e-2: does each lie inside its bounds?")
    parser.add_argument("--write", help="write a new spec with the proposed per-method LR bounds")
    parser.add_argument("--out", help="folder for lr_find.png, lr_find.json and learning_rate.yaml")
    args = parser.parse_intermixed_args(argv)

    quiet_libraries()
    spec = load_spec(args.spec, args.overrides)
    methods = args.methods.split(",") if args.methods else spec.methods
    for m in methods:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if not (0 < args.start < args.end):
        raise UserError(f"--start and --end must satisfy 0 < start < end, got ({args.start}, {args.end})")
    if not args.per_decade > 0:
        raise UserError(f"--per-decade must be > 0, got {args.per_decade}")
    steps = args.steps or math.ceil(args.per_decade * math.log10(args.end / args.start)) + 1
    if steps < 3:
        raise UserError(f"--steps must be at least 3, got {steps}")
    best = parse_best(args.best, methods)
    out = Path(args.out) if args.out else Path(spec.output_dir) / f"lr_find-{spec.name}"
    out.mkdir(parents=True, exist_ok=True)
    per_decade = (steps - 1) / math.log10(args.end / args.start)
    print(f"ramp {args.start:.0e} .. {args.end:.0e} in {steps} steps ({per_decade:.1f} a decade)")

    def fmt(v):
        return f"{v:.1e}" if v else "-"

    print(f"{'method':<12}{'steps':>6}{'time':>7}  {'reads from':>10}{'steepest':>9}{'minimum':>9}{'diverged':>9}"
          f"   proposed bounds    decades{'   best  inside' if best else ''}   ending")
    results, t0 = [], time.perf_counter()
    for method in methods:
        res = range_test(spec.base_train(), method, start=args.start, end=args.end, steps=steps)
        lrs, losses = [c[0] for c in res["curve"]], [c[1] for c in res["curve"]]
        s = res["suggestions"] = suggest(lrs, losses)
        at, log_s = smoothed(lrs, losses, s["beta"])
        res["smoothed"] = [(lr, math.exp(v)) for lr, v in zip(at, log_s)]
        check = ""
        if method in best:
            res["best"], res["inside"] = best[method], s["low"] <= best[method] <= s["high"]
            check = f"{best[method]:>7.0e}  {'yes' if res['inside'] else 'NO':>6}"
        print(f"{method:<12}{res['steps']:>6}{res['seconds']:>6.0f}s  {fmt(s['skip']):>10}{fmt(s['steepest']):>9}"
              f"{fmt(s['min_loss']):>9}{fmt(s['diverge']):>9}   {s['low']:.1e} .. {s['high']:.1e}"
              f"{math.log10(s['high'] / s['low']):>8.1f}  {check}   "
              f"{res['status']}{': ' + res['reason'] if res['reason'] else ''}", flush=True)
        if s["diverge"] is None and s["min_loss"] >= res["smoothed"][-1][0] / 10 ** 0.25:
            print(f"  {method}: the loss still fell at the end of the ramp; these bounds guess past it: raise --end")
        results.append(res)
    print(f"took {time.perf_counter() - t0:.0f} s")
    (out / "lr_find.json").write_text(json.dumps(results, indent=1))
    old = spec.space.get("learning_rate")
    block = yaml.safe_dump({"learning_rate": lr_block(results, getattr(old, "grid", None) or 6)}, sort_keys=False,
                           default_flow_style=None)
    (out / "learning_rate.yaml").write_text(block)
    print(f"\nspace.learning_rate for a sweep spec, seeded with these bounds ({out / 'learning_rate.yaml'}):\n")
    print("space:\n" + "".join(f"  {line}\n" for line in block.splitlines()))
    print(f"plot: {plot(results, out / 'lr_find.png', best)}")
    if args.write:
        print(f"spec: {write_spec(Path(args.spec), results, Path(args.write))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
