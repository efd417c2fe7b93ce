"""Learning-rate range test: find each method's LR bounds before a sweep.

    python scripts/lr_find.py search_spaces/lr.yaml
    python scripts/lr_find.py search_spaces/lr.yaml --methods full,lora --write search_spaces/lr_found.yaml

One short run per method with the LR ramped exponentially from --start to --end
(Smith 2015; fastai's lr_find, Lightning's finder). The loss is EMA-smoothed and
the run stops by itself once it passes 4x its minimum. Plots loss against LR,
suggests per-method bounds, and can write them into a new spec.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import yaml

from trainer.errors import UserError, cli_errors
from trainer.yamlio import safe_load


def range_test(base: dict, method: str, *, start: float, end: float, steps: int) -> dict:
    """One ramped run; returns the curve (lr, loss, smoothed) and how it ended."""
    from trainer.config import TrainConfig
    from trainer.loop import train

    cfg = TrainConfig.model_validate({
        **base, "method": method, "scheduler": "exponential", "lr_start": start, "learning_rate": end,
        "max_steps": steps, "stop_factor": 4.0, "warmup_ratio": 0.0, "eval_every": None,
        "memorization": False, "forgetting": False, "weight_change": False,
        "report_every": base.get("batch_size", 4) * base.get("grad_accum", 1), "output_dir": None, "save_model": False,
    })
    curve = []

    def report(m, checkpoint=None):
        if m.get("train_loss") is not None:
            curve.append((m["lr"], m["train_loss"], m.get("train_loss_ema")))

    result = train(cfg, report)
    return {"method": method, "curve": curve, "status": result.status, "reason": result.reason, "steps": result.metrics["step"]}


def plot(results: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for res in results:
        lrs = [c[0] for c in res["curve"]]
        line, = ax.plot(lrs, [c[1] for c in res["curve"]], alpha=0.25)
        ax.plot(lrs, res["smoothed"], color=line.get_color(), lw=2, label=f"{res['method']} ({res['steps']} steps)")
        sug = res["suggestions"]
        for key, marker in (("steepest", "v"), ("min_loss", "o"), ("diverge", "x")):
            if sug.get(key):
                i = min(range(len(lrs)), key=lambda j: abs(lrs[j] - sug[key]))
                ax.plot(lrs[i], res["smoothed"][i], marker, color=line.get_color(), ms=9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate (ramped)")
    ax.set_ylabel("train loss (faint: raw; bold: smoothed)")
    ax.set_title("LR range test  (v steepest descent, o minimum, x divergence)")
    ax.legend()
    ax.grid(alpha=0.25)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_spec(spec_path: Path, results: list[dict], target: Path) -> Path:
    from sweeps.spec import load_spec

    data = safe_load(spec_path.read_text())
    space = data.setdefault("space", {})
    old = space.get("learning_rate") if isinstance(space.get("learning_rate"), dict) else {}
    space["learning_rate"] = {"log": True, "grid": old.get("grid", 6), "per_method": {
        r["method"]: {"low": float(f"{r['suggestions']['low']:.2g}"), "high": float(f"{r['suggestions']['high']:.2g}"), "log": True}
        for r in results}}
    data["name"] = f"{data.get('name', 'sweep')}-lrfind"
    header = f"# python sweeps/run.py {target}\n# LR bounds from: python scripts/lr_find.py {spec_path}\n"
    target.write_text(header + yaml.safe_dump(data, sort_keys=False))
    load_spec(target)  # a spec we cannot load again is a bug here, not a user error
    return target


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/lr_find.py", description="LR range test per method.")
    parser.add_argument("spec")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--methods", help="comma-separated (default: the spec's methods)")
    parser.add_argument("--start", type=float, default=1e-7)
    parser.add_argument("--end", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--write", help="write a new spec with the proposed per-method LR bounds")
    parser.add_argument("--out", help="folder for lr_find.png and lr_find.json")
    args = parser.parse_intermixed_args(argv)

    from sweeps.lr_range import smooth, suggest
    from sweeps.spec import load_spec
    from trainer.quiet import quiet_libraries

    quiet_libraries()
    spec = load_spec(args.spec, args.overrides)
    methods = args.methods.split(",") if args.methods else spec.methods
    from trainer.methods import METHODS

    for m in methods:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if not (0 < args.start < args.end):
        raise UserError(f"--start and --end must satisfy 0 < start < end, got ({args.start}, {args.end})")
    out = Path(args.out) if args.out else Path(spec.output_dir) / f"lr_find-{spec.name}"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"{'method':<12}{'steps':>6}  {'steepest':>9}{'min loss':>9}{'diverge':>9}   proposed bounds   ending")
    for method in methods:
        res = range_test(spec.base_train(), method, start=args.start, end=args.end, steps=args.steps)
        lrs, losses = [c[0] for c in res["curve"]], [c[1] for c in res["curve"]]
        res["smoothed"] = smooth(losses)
        res["suggestions"] = suggest(lrs, losses)
        s = res["suggestions"]
        fmt = lambda v: f"{v:.1e}" if v else "-"  # noqa: E731
        print(f"{method:<12}{res['steps']:>6}  {fmt(s['steepest']):>9}{fmt(s['min_loss']):>9}{fmt(s['diverge']):>9}"
              f"   {s['low']:.1e} .. {s['high']:.1e}   {res['status']}{': ' + res['reason'] if res['reason'] else ''}")
        results.append(res)
    (out / "lr_find.json").write_text(json.dumps(results, indent=1))
    print(f"plot: {plot(results, out / 'lr_find.png')}")
    if args.write:
        print(f"spec: {write_spec(Path(args.spec), results, Path(args.write))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
