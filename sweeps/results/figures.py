"""The sweep's figures (matplotlib, Agg): the map, the loss curves, the per-method panel, what changed,
learning against forgetting (the Pareto front), and which settings mattered.

Every function writes one PNG and returns its path; missing data gives a panel that says so.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from sweeps.results.analysis import MARGIN, MIN_LRS, best_trial, final_loss, lr_sensitivity, methods, window  # noqa: E402
from sweeps.results.edges import lr_text  # noqa: E402
from sweeps.results.records import LABELS, OUTCOMES  # noqa: E402
from sweeps.results.tradeoff import front, fronts_by_method, points  # noqa: E402
from trainer.methods import METHODS  # noqa: E402

OUTCOME_COLORS = {
    "converged": "#2a9d3f", "slow": "#8ecae6", "oscillating": "#f4a261", "overfit": "#7b2cbf",
    "diverged": "#d62828", "pruned": "#9e9e9e", "failed": "#000000", "unfinished": "#e0d7c6",
}
assert set(OUTCOME_COLORS) == set(OUTCOMES), "every outcome has a colour"
_DPI = 110


def _panels(n: int, height: float = 3.6):
    fig, axes = plt.subplots(1, max(n, 1), figsize=(4.6 * max(n, 1), height), squeeze=False)
    return fig, list(axes[0])


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=_DPI)
    plt.close(fig)
    return out


def _empty(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777")
    ax.set_xticks([])
    ax.set_yticks([])


def _y_axis(records) -> str:
    for key in ("batch_size", "epochs", "lora_r"):
        if len({r.config.get(key) for r in records}) > 1:
            return key
    return "batch_size"


_EDGE, _WELL, _UNSTABLE = "#d62828", "#2a9d3f", "#f4a261"


def map_figure(records, out: Path) -> Path:
    """Per method: learning rate (log) x batch size, coloured by outcome, annotated with the final eval loss.

    Grid trials are squares with their loss; refinement trials (``sweeps.launch.refine``) smaller circles. Each row is a
    group's window (``sweeps.results.analysis.window``): green bars where it learns well (converged within 5% of the row's
    best), an orange tick where instability starts (the lowest LR that oscillated or diverged) and a red bar for its
    divergence edge (between the highest LR that did not diverge and the lowest that did)."""
    ms = methods(records)
    fig, axes = _panels(len(ms), 3.4)
    ykey = _y_axis(records)
    ys = sorted({r.config.get(ykey) for r in records if r.config.get(ykey) is not None})
    for ax, method in zip(axes, ms):
        mine = [r for r in records if r.method == method]
        for r in mine:
            y = ys.index(r.config.get(ykey)) if r.config.get(ykey) in ys else 0
            refined = r.refine is not None
            ax.scatter(r.learning_rate, y, s=110 if refined else 420, marker="o" if refined else "s",
                       color=OUTCOME_COLORS.get(r.outcome, "#ccc"), edgecolor="white", zorder=3)
            loss = final_loss(r)
            label = f"{loss:.2f}" if loss is not None else ("fail" if r.outcome == "failed" else "-")
            if not refined:
                ax.annotate(label, (r.learning_rate, y), ha="center", va="center", fontsize=7, color="white", zorder=4)
        for i, y in enumerate(ys):
            row = [r for r in mine if r.config.get(ykey) == y and r.outcome not in ("failed", "unfinished")]
            w = window(row)
            if w.n_lrs < MIN_LRS:  # as in the findings: too few LRs to place a window or an edge
                continue
            e = w.edge
            if e and e.below and e.above:
                ax.hlines(i + 0.36, e.below, e.above, color=_EDGE, lw=3.5, zorder=2)
            for lo, hi in w.well:  # a single LR: a short bar around it
                ax.hlines(i - 0.36, lo / (1.12 if lo == hi else 1), hi * (1.12 if lo == hi else 1), color=_WELL, lw=3.5, zorder=2)
            if w.unstable is not None:
                ax.plot([w.unstable], [i + 0.36], marker="|", markersize=14, mew=3, color=_UNSTABLE, zorder=4)
        ax.set_xscale("log")
        lrs = [r.learning_rate for r in mine if r.learning_rate > 0]
        if lrs:
            ax.set_xlim(min(lrs) / 2.5, max(lrs) * 2.5)
        ax.set_yticks(range(len(ys)), [str(y) for y in ys])
        ax.set_ylim(-0.7, len(ys) - 0.3)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("learning rate")
        ax.set_ylabel(ykey.replace("_", " "))
        ax.grid(alpha=0.25)
    handles = [plt.Line2D([], [], marker="s", ls="", color=c, markersize=9, label=LABELS[o]) for o, c in OUTCOME_COLORS.items()]
    if any(r.refine is not None for r in records):
        handles.append(plt.Line2D([], [], marker="o", ls="", color="#777", markersize=6, label="refinement trial"))
    handles += [plt.Line2D([], [], color=_WELL, lw=3.5, label=f"learns well (converged, within {MARGIN:.0%} of best)"),
                plt.Line2D([], [], color=_UNSTABLE, marker="|", markersize=10, mew=3, ls="", label="instability starts"),
                plt.Line2D([], [], color=_EDGE, lw=3.5, label="divergence edge")]
    ncol = 3 if len(ms) < 2 else math.ceil(len(handles) / 2)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False, fontsize=8)
    if not ms:
        _empty(axes[0])
    fig.suptitle("Where does it learn well, turn unstable, diverge? (cell text: final eval loss)", fontsize=11)
    rows = math.ceil(len(handles) / ncol)  # the legend's rows, below the panels
    fig.tight_layout(rect=(0, 0.03 + 0.055 * rows, 1, 0.95))
    fig.savefig(out, dpi=_DPI)
    plt.close(fig)
    return Path(out)


def curves_figure(records, out: Path) -> Path:
    """Train loss (lines) and eval loss (dots) against examples seen; colour = learning rate (log scale)."""
    ms = methods(records)
    fig, axes = _panels(len(ms))
    lrs = [r.learning_rate for r in records if r.learning_rate > 0]
    norm = LogNorm(min(lrs), max(lrs) if max(lrs) > min(lrs) else min(lrs) * 10) if lrs else None
    cmap = plt.get_cmap("viridis")
    for ax, method in zip(axes, ms):
        drawn = False
        for r in (r for r in records if r.method == method):
            pts = [(h["examples_seen"], h["train_loss"]) for h in r.history if h.get("train_loss") is not None]
            if not pts or norm is None:
                continue
            color = cmap(norm(r.learning_rate))
            ax.plot(*zip(*pts), color=color, lw=1.2, alpha=0.9, ls="--" if r.outcome in ("pruned", "diverged") else "-")
            if r.outcome == "overfit":  # its held-out loss rose while this train curve fell
                ax.plot(*pts[-1], marker="^", color=OUTCOME_COLORS["overfit"], markersize=7, zorder=5)
            ev = [(h["examples_seen"], h["eval_loss"]) for h in r.history if h.get("eval_loss") is not None]
            if ev:
                ax.plot(*zip(*ev), "o", color=color, markersize=4)
            drawn = True
        if not drawn:
            _empty(ax)
            continue
        ax.set_yscale("log")
        ax.set_title(f"{method} (dashed: stopped early; dots: eval; ^: overfit)", fontsize=9)
        ax.set_xlabel("examples seen")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.25)
    if norm is not None:
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="learning rate", fraction=0.03)
    fig.savefig(out, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return Path(out)


def method_panel_figure(records, out: Path) -> Path:
    """Final eval loss against LR per batch size, each with its window (``sweeps.results.analysis.window``): where it learns
    well shaded, where instability starts (orange x) and the first LR that diverged (red v); the best LR marked,
    the sensitivity in the title."""
    ms = methods(records)
    fig, axes = _panels(len(ms))
    for ax, method in zip(axes, ms):
        mine = [r for r in records if r.method == method and final_loss(r) is not None]
        if not mine:
            _empty(ax, f"{method}: no finished trial")
            continue
        for bs in sorted({r.config.get("batch_size") for r in mine}, key=str):
            pts = sorted((r.learning_rate, final_loss(r)) for r in mine if r.config.get("batch_size") == bs)
            (line,) = ax.plot(*zip(*pts), "o-", label=f"bs {bs}")
            w = window([r for r in records if r.method == method and r.config.get("batch_size") == bs])
            if w.n_lrs < MIN_LRS:
                continue
            for k, (lo, hi) in enumerate(w.well):
                ax.axvspan(lo / 1.15, hi * 1.15, color=line.get_color(), alpha=0.12,
                           label=f"learns well, bs {bs}" if k == 0 else None)
            loss_at = dict(pts)
            if w.unstable is not None and w.unstable in loss_at:
                ax.plot([w.unstable], [loss_at[w.unstable]], "x", ms=11, mew=2.5, color=_UNSTABLE,
                        label=_once(ax, "instability starts"))
            if w.edge and w.edge.above and w.edge.above in loss_at:
                ax.plot([w.edge.above], [loss_at[w.edge.above]], "v", ms=9, color=_EDGE, label=_once(ax, "diverges"))
        l0 = mine[0].final.get("l0")
        if l0:
            ax.axhline(l0, color="#777", ls=":", label="l0 (base)")
        best = best_trial(records, method)
        if best:
            ax.axvline(best.learning_rate, color="#2a9d3f", lw=1, label=f"best {best.learning_rate:.0e}")
        sens = lr_sensitivity(records, method)
        ax.set_title(f"{method}: LR sensitivity {sens:.2f}" if sens is not None else method, fontsize=10)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final eval loss (min with l0)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.25)
    return _save(fig, out)


def _once(ax, label: str) -> str | None:
    """A legend label the first time a panel draws it (one entry for every batch size's marker)."""
    return None if label in [h.get_label() for h in ax.get_lines()] else label


def _mean_by_lr(records, key: str) -> tuple[list[float], list[float]]:
    """One point per learning rate (the mean over batch sizes, epochs, ...): a line, not a zig-zag."""
    by_lr: dict[float, list[float]] = {}
    for r in records:
        value = r.final.get(key)
        if value is not None and math.isfinite(value):
            by_lr.setdefault(r.learning_rate, []).append(value)
    lrs = sorted(by_lr)
    return lrs, [sum(by_lr[lr]) / len(by_lr[lr]) for lr in lrs]


def changes_figure(records, out: Path) -> Path:
    """Memorization and forgetting against LR per method; weight change by layer for each method's best trial."""
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 3.8))
    any_mem = any_forget = any_w = False
    for method in methods(records):
        done = sorted((r for r in records if r.method == method and r.final.get("train_exact_match") is not None),
                      key=lambda r: r.learning_rate)
        if done:
            any_mem = True
            lrs, train_em = _mean_by_lr(done, "train_exact_match")
            a1.plot(lrs, train_em, "o-", label=f"{method} train")
            a1.plot(*_mean_by_lr(done, "eval_exact_match"), "x--", label=f"{method} held-out")
        forg = [r for r in done if r.final.get("forgetting") is not None]
        if forg:
            any_forget = True
            a2.plot(*_mean_by_lr(forg, "forgetting"), "o-", label=method)
        best = best_trial(records, method)
        rows = (best.final.get("weight_change_by_layer") or []) if best else []
        if rows:
            any_w = True
            vals = [max(row["rel_change"], 1e-12) for row in rows]
            a3.plot(range(len(rows)), vals, "o-", ms=3, label=f"{method} (lr {best.learning_rate:.0e})")
            a3.set_xticks(range(len(rows))[:: max(1, len(rows) // 10)],
                          [rows[i]["layer"] for i in range(0, len(rows), max(1, len(rows) // 10))], rotation=45, fontsize=7)
    for ax, ok, title, ylabel in (
        (a1, any_mem, "memorization: greedy exact match (mean per LR)", "exact match"),
        (a2, any_forget, "forgetting: reference NLL change (nats, mean per LR)", "delta NLL"),
        (a3, any_w, "weight change by layer, best trial", "||W - W0|| / ||W0||"),
    ):
        if not ok:
            _empty(ax)
            ax.set_title(title, fontsize=10)
            continue
        if ax is not a3:
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
        else:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.25)
    return _save(fig, out)


_LR_MARKERS = "o^sDvP*Xh<>p"


def _method_color(method: str, index: int) -> str:
    own = METHODS[method].color if method in METHODS else None
    return own or plt.get_cmap("tab10")(index % 10)


def _steps(front) -> tuple[list[float], list[float]]:
    """A front as the staircase it is: from each point, the forgetting holds until the next point's loss."""
    xs, ys = [], []
    for i, p in enumerate(front):
        xs.append(p.loss)
        ys.append(p.forgetting)
        if i + 1 < len(front):
            xs.append(front[i + 1].loss)
            ys.append(p.forgetting)
    return xs, ys


def tradeoff_figure(records, out: Path) -> Path:
    """Held-out loss (x) against forgetting (y): one point per finished trial, coloured by method and marked by
    its learning-rate decade; the points on a method's front are labelled with their LR. Each method's front
    is dashed, the overall front black; the right axis reads forgetting as a factor on the base perplexity."""
    pts = points(records)
    fig, ax = plt.subplots(figsize=(9.0, 5.6))
    if not pts:
        _empty(ax, "no finished trial measured forgetting (train.forgetting: true measures it)")
        ax.set_title("learning against forgetting", fontsize=11)
        return _save(fig, out)
    decades = sorted({_decade(p.record.learning_rate) for p in pts})
    marker = {d: _LR_MARKERS[i % len(_LR_MARKERS)] for i, d in enumerate(decades)}
    handles = []
    for i, (method, mfront) in enumerate(fronts_by_method(pts).items()):
        color = _method_color(method, i)
        for p in (p for p in pts if p.record.method == method):
            ax.scatter(p.loss, p.forgetting, marker=marker[_decade(p.record.learning_rate)], s=46, color=color,
                       edgecolor="white", zorder=3)
        for p in mfront:
            ax.annotate(lr_text(p.record.learning_rate), (p.loss, p.forgetting), fontsize=6,
                        xytext=(3, 4), textcoords="offset points", color="#333")
        handles += ax.plot(*_steps(mfront), ls="--", lw=1.2, color=color, label=f"{method}: {len(mfront)} on its front")
    overall = front(pts)
    handles += ax.plot(*_steps(overall), color="black", lw=2.4, alpha=0.5, zorder=2,
                       label=f"overall front: {len(overall)} of {len(pts)} trials")
    handles += [plt.Line2D([], [], marker=marker[d], ls="", color="#666", label=f"lr 1e{d} to 1e{d + 1}") for d in decades]
    ax.axhline(0, color="#999", lw=0.8, ls=":")
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7.5, frameon=False)
    ax.set_xlabel("held-out loss (lower: learned more)")
    ax.set_ylabel("forgetting: reference NLL change (nats)")
    _perplexity_axis(ax)
    ax.set_title("Learning against forgetting: each point a trial, lower left is better on both;\n"
                 "labels: the learning rate of each point on its method's front", fontsize=10)
    ax.grid(alpha=0.25)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out, dpi=_DPI)
    plt.close(fig)
    return Path(out)


def _decade(lr: float) -> int:
    return math.floor(math.log10(lr) + 1e-9)


def _perplexity_axis(ax) -> None:
    """A right axis in exp(forgetting): the factor on the base model's perplexity on the reference text."""
    right = ax.secondary_yaxis("right", functions=(np.exp, lambda f: np.log(np.clip(f, 1e-12, None))))
    y0, y1 = ax.get_ylim()
    ticks: list[float] = []
    for t in sorted((0.5, 0.8, 1, 1.25, 1.5, 2, 3, 5, 10, 20, 50, 100, 300, 1000, 1e4), key=lambda t: abs(math.log(t))):
        # 1x (no change) first; then no tick closer than 1/12 of the axis to another, so every label reads
        if y0 <= math.log(t) <= y1 and all(abs(math.log(t / u)) >= (y1 - y0) / 12 for u in ticks):
            ticks.append(t)
    ticks.sort()
    right.set_yticks(ticks, [f"{t:g}x" for t in ticks])
    right.set_ylabel("reference perplexity vs the base model")


def importance_figure(importances: dict[str, dict[str, float]], out: Path, note: str = "") -> Path:
    """One panel per objective: each searched setting's importance (Optuna fANOVA), largest on top."""
    fig, axes = _panels(max(len(importances), 1), 3.0)
    if not importances:
        _empty(axes[0], note or "not enough finished trials for parameter importance")
        axes[0].set_title("parameter importance", fontsize=10)
        return _save(fig, out)
    for ax, (objective, values) in zip(axes, importances.items()):
        names = list(values)[::-1]
        ax.barh(names, [values[n] for n in names], color="#457b9d")
        for y, n in enumerate(names):
            ax.text(values[n] + 0.01, y, f"{values[n]:.2f}", va="center", fontsize=8)
        ax.set_xlim(0, 1.1)
        ax.set_title(f"what mattered for {objective}", fontsize=10)
        ax.set_xlabel("importance (fANOVA, sums to 1)")
    return _save(fig, out)
