"""The report on synthetic sweeps (a method that always diverged, one batch size, failed trials) and the
measures behind it: LR sensitivity, each group's window (learns well, instability, divergence), the guards on
comparisons and the findings in plain words.

Fast: synthetic TrialRecords in a sweep folder's trials.json (no Ray, no training).

    python -m pytest -q tests/sweeps/test_report.py
"""
from __future__ import annotations

import contextlib
import io
import itertools
import math
import re
from pathlib import Path

import matplotlib.collections
import matplotlib.colors
import matplotlib.image
import pytest

from sweeps.results.analysis import best_lr, diagnose, final_loss, lr_sensitivity, window
from sweeps.results.figures import OUTCOME_COLORS
from sweeps.results.records import TrialRecord, save_records
from tests.conftest import run_cli

L0 = 3.0  # the base model's eval loss in every synthetic trial
FILES = ("map.png", "curves.png", "methods.png", "changes.png", "tradeoff.png", "importance.png", "report.html")
OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
_ids = itertools.count()


def _config(method: str, lr: float, bs: int) -> dict:
    return {"method": method, "learning_rate": lr, "batch_size": bs, "epochs": 1}


def _history(losses: list[float], bs: int, evals: dict[int, float] | None = None) -> list[dict]:
    """Rows as the trainer reports them (one step per report), with eval points at the given report indices."""
    rows, ema = [], 0.0
    for i, loss in enumerate(losses):
        ema = 0.98 * ema + 0.02 * loss
        rows.append({"step": i + 1, "examples_seen": (i + 1) * bs, "train_loss": loss,
                     "train_loss_ema": ema / (1 - 0.98 ** (i + 1)), "grad_norm": 1.0, "lr": 1e-4, "l0": L0})
        if evals and i in evals:
            rows[-1]["eval_loss"] = evals[i]
    return rows


# --- records for the analysis measures: the outcome is given, not classified -----------------------------


def _trial(method: str, lr: float, outcome: str, loss: float | None = None, *, bs: int = 8,
           history: list[dict] | None = None, **final) -> TrialRecord:
    fin = {"l0": L0, **final}
    if loss is not None:
        fin["eval_loss"] = loss
    return TrialRecord(trial_id=f"t{next(_ids)}", config=_config(method, lr, bs), history=history or [],
                       final=fin, outcome=outcome, evidence=f"given: {outcome}",
                       error=OOM if outcome == "failed" else None)


def _grid() -> list[TrialRecord]:
    """full over five LRs (two batch sizes at 1e-5), plus a lora trial that must not count for full."""
    return [
        _trial("full", 1e-5, "slow", 2.4, bs=8),
        _trial("full", 1e-5, "slow", 2.6, bs=16),
        _trial("full", 1e-4, "converged", 1.0),
        _trial("full", 1e-3, "oscillating", 1.5),
        _trial("full", 1e-2, "diverged", 3.2),  # counts as min(3.2, l0) = 3.0
        _trial("lora", 1e-3, "converged", 0.2),
    ]


def test_lr_sensitivity_is_the_mean_over_lrs_of_the_gap_to_the_best_final_loss():
    # per LR: mean(2.4, 2.6) - 1.0 = 1.5; 0.0; 0.5; min(3.2, 3.0) - 1.0 = 2.0 -> mean 4.0 / 4
    assert lr_sensitivity(_grid(), "full") == pytest.approx(1.0)


def test_lr_sensitivity_leaves_out_failed_and_never_evaluated_pruned_trials():
    extra = [_trial("full", 1e-1, "failed"), _trial("full", 3e-2, "pruned", None, history=_history([3.0, 2.9], 8))]
    assert lr_sensitivity(_grid() + extra, "full") == pytest.approx(1.0)


def test_lr_sensitivity_of_a_method_without_a_finished_trial_is_none():
    assert lr_sensitivity([_trial("full", 1e-4, "failed")], "full") is None


def test_final_loss_is_capped_at_l0():
    assert final_loss(_trial("full", 1e-2, "diverged", 7.5)) == L0


def _window_trials() -> list[TrialRecord]:
    return [
        _trial("full", 1e-5, "slow", 2.0),
        _trial("full", 3e-5, "converged", 1.04),  # within 5% of the best
        _trial("full", 1e-4, "converged", 1.0),  # the best
        _trial("full", 3e-4, "converged", 1.06),  # just outside 5%
        _trial("full", 1e-3, "oscillating", 1.5),  # not diverged: the window reaches it
        _trial("full", 3e-3, "diverged", 3.0),
        _trial("full", 1e-2, "diverged", 3.0),
    ]


def test_window_learns_well_where_converged_within_margin_then_instability_then_divergence():
    w = window(_window_trials())
    assert w.well == [(3e-5, 1e-4)] and (w.unstable, w.unstable_how) == (1e-3, "oscillating")
    assert (w.edge.below, w.edge.above) == (1e-3, 3e-3) and w.best.learning_rate == 1e-4 and w.n_lrs == 7


@pytest.mark.parametrize("margin, well", [(0.03, [(1e-4, 1e-4)]), (0.05, [(3e-5, 1e-4)]), (0.10, [(3e-5, 3e-4)])])
def test_window_learns_well_within_the_margin_of_the_best(margin, well):
    assert window(_window_trials(), margin=margin).well == well


def test_no_range_called_good_holds_an_oscillating_trial_even_one_with_a_good_loss():
    """The issue's lr.yaml: 'stable 1e-3 to 1.8e-2' although 1e-2 oscillated. Here 3.2e-3 oscillated at a loss within
    the margin and 5.6e-3 converged above it: two runs, and the instability is said to start at 3.2e-3."""
    trials = [_trial("full", 1e-3, "converged", 1.0), _trial("full", 1.8e-3, "converged", 1.02),
              _trial("full", 3.2e-3, "oscillating", 1.01), _trial("full", 5.6e-3, "converged", 1.03),
              _trial("full", 1e-2, "oscillating", 1.4), _trial("full", 3.2e-2, "diverged", 3.0)]
    w = window(trials)
    assert w.well == [(1e-3, 1.8e-3), (5.6e-3, 5.6e-3)]
    assert w.text() == ("learns well at 1e-3 to 1.8e-3, 5.6e-3 (converged within 5% of its best held-out loss, 1.000); "
                        "instability starts at 3.2e-3 (oscillating, though 5.6e-3 above it converged); "
                        "diverges between 1e-2 and 3.2e-2 (3.2x)")


def test_window_of_a_group_where_every_trial_diverged_has_no_best_and_no_good_range():
    w = window([_trial("full", lr, "diverged", 3.0) for lr in (1e-4, 1e-3)])
    assert w.best is None and w.well == [] and (w.unstable, w.unstable_how) == (1e-4, "diverged")


def test_best_lr_ignores_diverged_and_pruned_trials_even_with_lower_loss():
    trials = _window_trials() + [_trial("full", 2e-4, "pruned", 0.5, history=_history([3.0], 8, {0: 0.5})),
                                 _trial("full", 5e-3, "diverged", 0.4)]
    assert best_lr(trials, "full") == 1e-4


# --- findings in plain words ----------------------------------------------------------------------------


def _finding(records, method: str) -> str:
    return next(f for f in diagnose(records) if f.startswith(f"{method}: ") and "from batch" not in f
                and "too low" not in f)


def test_findings_say_each_batch_sizes_window_and_pool_no_edge_across_batch_sizes():
    records = [_trial("full", 1e-4, "converged", 1.0), _trial("full", 1e-3, "diverged", 3.0, bs=8),
               _trial("full", 1e-2, "diverged", 3.0), _trial("full", 1e-4, "converged", 1.1, bs=16),
               _trial("full", 1e-3, "converged", 1.05, bs=16), _trial("full", 1e-2, "diverged", 3.0, bs=16)]
    findings = diagnose(records)
    method = _finding(records, "full")
    assert "diverged at lr >=" not in method and "stable" not in " ".join(findings)
    assert method.endswith("6 trial(s): 3 converged, 3 diverged"), "where, per batch size: the lines below"
    assert ("full, batch 8: learns well at 1e-4 (converged within 5% of its best held-out loss, 1.000); instability "
            "starts at 1e-3 (diverged); diverges between 1e-4 and 1e-3 (10x)") in " ".join(findings)
    assert ("full, batch 16: learns well at 1e-4 to 1e-3 (converged within 5% of its best held-out loss, 1.050); "
            "instability starts at 1e-2 (diverged); diverges between 1e-3 and 1e-2 (10x)") in " ".join(findings)


def test_finding_gives_best_lr_and_sensitivity_and_the_groups_window():
    findings = diagnose(_window_trials())
    text = _finding(_window_trials(), "full")
    assert "best lr 1e-4 (eval loss 1.000, l0 3.000, converged)" in text
    assert f"LR sensitivity {lr_sensitivity(_window_trials(), 'full'):.2f}" in text
    assert "7 trial(s): 3 converged, 1 slow, 1 oscillating, 2 diverged" in text
    assert any(f.startswith("full, batch 8: learns well at 3e-5 to 1e-4 (converged within 5% of its best held-out loss, "
                            "1.000); instability starts at 1e-3 (oscillating); diverges between 1e-3 and 3e-3 (3x); "
                            "best lr 1e-4 (optimum in 5.5e-5 .. 1.7e-4, within 1.8x) [7 LRs]") for f in findings), findings


def test_finding_says_when_every_trial_of_a_method_diverged():
    records = [_trial("full", lr, "diverged", 3.0) for lr in (1e-4, 1e-3, 1e-2)]
    assert _finding(records, "full") == ("full: every trial diverged (3/3), even at lr 1e-4: "
                                         "lower the learning-rate range")


def test_finding_says_when_every_trial_of_a_method_failed():
    records = [_trial("lora", 1e-3, "failed"), _trial("lora", 1e-2, "failed"), _trial("full", 1e-4, "converged", 1.0)]
    assert _finding(records, "lora") == "lora: all 2 trial(s) failed (given: failed)"


def test_finding_counts_failed_trials_next_to_finished_ones():
    records = [_trial("full", 1e-4, "converged", 1.0), _trial("full", 1e-3, "failed")]
    assert _finding(records, "full").endswith("; 1 failed")


def test_finding_for_a_method_pruned_before_any_eval_says_so_instead_of_being_empty():
    records = [_trial("full", lr, "pruned", None, history=_history([3.0, 2.9], 8)) for lr in (1e-4, 1e-3)]
    records.append(_trial("full", 1e-2, "failed"))
    assert _finding(records, "full") == "full: no trial reached an eval loss (2 pruned); 1 failed"


def test_low_lrs_that_barely_moved_are_too_low_for_this_budget():
    records = [_trial("full", 1e-6, "slow", 2.95), _trial("full", 1e-5, "slow", 2.9),
               _trial("full", 1e-4, "converged", 1.0)]  # achievable drop 2.0: 0.05 and 0.1 are < 10% of it
    assert ("full: lr <= 1e-5 too low for this budget (gained at most 3% of l0, against 67% at its best lr 1e-4): "
            "raise the learning rate or train longer" in diagnose(records))


def test_too_low_is_said_for_every_method_not_only_one():
    records = [_trial("full", 1e-5, "slow", 2.9), _trial("full", 1e-4, "converged", 1.0),
               _trial("lora", 1e-4, "slow", 2.8), _trial("lora", 1e-3, "converged", 1.2),
               _trial("last_layer", 1e-4, "slow", 2.9), _trial("last_layer", 1e-3, "slow", 2.85),
               _trial("last_layer", 1e-2, "converged", 2.0)]
    found = [f for f in diagnose(records) if "too low for this budget" in f]
    assert [f.split(":")[0] for f in found] == ["full", "lora", "last_layer"]
    assert found[2].startswith("last_layer: lr <= 1e-3 too low")


def test_no_too_low_finding_when_the_lowest_lr_learned_enough():
    records = [_trial("full", 1e-5, "converged", 2.7), _trial("full", 1e-4, "converged", 1.0)]
    assert not any("too low" in f for f in diagnose(records))


def test_sweep_where_nothing_beat_l0_says_nothing_was_learned():
    records = [_trial("full", 1e-4, "diverged", 3.0), _trial("full", 1e-6, "converged", 3.0)]
    assert any("nothing was learned" in f for f in diagnose(records))


def _overfit_history(last_eval: float) -> list[dict]:
    losses = [3.0 - 0.05 * i for i in range(16)]  # train loss keeps falling
    return _history(losses, 8, evals={3: 2.0, 7: 1.5, 11: 1.6, 15: last_eval})


def test_overfit_trials_are_named_with_their_lrs_and_the_cure_not_called_diverged():
    records = [_trial("full", 1e-4, "converged", 1.4, history=_overfit_history(1.4)),
               _trial("full", 5e-4, "overfit", 3.2, history=_overfit_history(3.2)),
               _trial("full", 1e-3, "overfit", 3.3, history=_overfit_history(3.3))]
    findings = diagnose(records)
    assert ("full: at lr >= 5e-4 the training loss fell (by up to 22%) but the held-out loss rose above the base "
            "model's: overfitting or a train/eval mismatch, not divergence. Try fewer epochs, a lower LR, or eval data "
            "drawn like the training data") in findings
    assert not any("diverged" in f for f in findings)


def test_a_best_trial_that_overfit_says_fewer_epochs_would_do_better():
    records = [_trial("full", 1e-4, "overfit", 1.7, history=_overfit_history(1.7)), _trial("full", 1e-5, "slow", 2.9)]
    assert any(f.startswith("full: its best trial (lr 1e-4) overfit too") for f in diagnose(records))


def test_no_overfit_finding_without_an_overfit_trial():
    record = _trial("full", 1e-4, "converged", 1.4, history=_overfit_history(1.4))
    assert not any("overfit" in f for f in diagnose([record]))


def test_the_edge_at_each_batch_size_and_how_it_moved_against_the_scaling_rules():
    records = [_trial("full", 1e-5, "converged", 1.2, bs=4), _trial("full", 1e-4, "converged", 1.0, bs=4),
               _trial("full", 1e-3, "diverged", 3.0, bs=4),
               _trial("full", 1e-4, "converged", 1.1, bs=16), _trial("full", 1e-3, "converged", 1.0, bs=16),
               _trial("full", 1e-2, "diverged", 3.0, bs=16)]
    findings = diagnose(records)
    assert ("full, batch 4: learns well at 1e-4 (converged within 5% of its best held-out loss, 1.000); instability "
            "starts at 1e-3 (diverged); diverges between 1e-4 and 1e-3 (10x); best lr 1e-4 (optimum in 3.2e-5 .. 3.2e-4, "
            "within 3.2x) [3 LRs]") in findings
    assert any(f.startswith("full, batch 16: learns well at 1e-3 (") and "diverges between 1e-3 and 1e-2 (10x); best lr "
               "1e-3 (the highest LR tried" not in f for f in findings)
    # edge 3.2e-4 at batch 4, 3.2e-3 at batch 16: 10x, anywhere from 1x to 100x given the intervals
    assert ("full: from batch 4 to 16 the divergence edge moved 10x (1x .. 100x); predicted: linear 4x fits, "
            "square-root 2x fits, no change 1x fits") in findings
    fewer = diagnose(records[1:])  # batch 4 with 2 LRs: no window, no edge, no batch-size rule
    assert not any(f.startswith("full, batch 4:") for f in fewer)
    assert ("too few learning rates to place a window or an edge (fewer than 3 in the group): full, batch 4 (2)"
            in fewer)
    assert ("full: how the divergence edge moves from batch 4 to 16 is not stated, batch 4 has 2 LR(s), fewer than 3"
            in fewer)


def _lora_and_full(lora: list[tuple[float, str, float]], full: list[tuple[float, str, float]]) -> list[TrialRecord]:
    return ([_trial("lora", lr, o, loss) for lr, o, loss in lora] + [_trial("full", lr, o, loss) for lr, o, loss in full])


def test_lora_against_full_is_stated_between_converged_optima_with_three_lrs_each():
    records = _lora_and_full([(1e-4, "slow", 2.5), (1e-3, "converged", 1.2), (1e-2, "diverged", 3.0)],
                             [(1e-5, "slow", 2.4), (1e-4, "converged", 1.0), (1e-3, "oscillating", 1.6)])
    assert ("LoRA's best LR is 10x full fine-tuning's at batch 8 (1e-3 against 1e-4, both converged; the optima's "
            "brackets allow 1x .. 100x; the rule of thumb says about 10x)") in diagnose(records)


@pytest.mark.parametrize("lora, full, why", [
    # the "505x" from a sweep where nothing learned: the best trials were slow
    ([(1e-4, "slow", 2.9), (1e-3, "slow", 2.85), (1e-2, "slow", 2.8)],
     [(1e-5, "slow", 2.95), (1e-4, "slow", 2.9), (1e-3, "slow", 2.92)],
     "no lora trial converged at its best (its best trial (lr 1e-2) was slow)"),
    # the "1x, brackets open-ended" from one LR per method
    ([(1e-3, "converged", 1.0)], [(1e-3, "converged", 1.1)], "lora has 1 LR(s), fewer than 3"),
    ([(1e-4, "slow", 2.5), (1e-3, "converged", 1.2), (1e-2, "diverged", 3.0)],
     [(1e-5, "slow", 2.4), (1e-4, "converged", 1.3), (1e-3, "converged", 1.0)],
     "full's best LR is at an end of its range (the optimum may lie beyond it)"),
])
def test_lora_against_full_says_why_it_is_not_stated(lora, full, why):
    found = [f for f in diagnose(_lora_and_full(lora, full)) if f.startswith("LoRA's best LR")]
    assert found == [f"LoRA's best LR against full fine-tuning's at batch 8: not stated, {why}"]


def test_a_small_held_out_set_is_said_first():
    few = [_trial("full", 1e-4, "converged", 1.0, eval_records=1)]
    assert diagnose(few)[0] == ("warning: the held-out set has 1 record(s), fewer than 8: every held-out loss, overfit "
                                "verdict and best trial below rests on them; give more held-out records (data.eval, or a "
                                "larger data.eval_fraction)")
    assert not any("held-out set has" in f for f in diagnose([_trial("full", 1e-4, "converged", 1.0, eval_records=8)]))


def test_forgetting_is_reported_at_each_methods_best_lr():
    records = [_trial("full", 1e-4, "converged", 1.0, forgetting=0.12),
               _trial("full", 1e-3, "converged", 1.5, forgetting=0.9)]
    assert any(f.startswith("forgetting") and f.endswith("full +0.12") for f in diagnose(records))


# --- whole report on synthetic sweep folders (classified again on load, as `sweeps/report.py` does) ------


def _converged(method: str, lr: float, bs: int, final_eval: float) -> TrialRecord:
    losses = [final_eval + (L0 - final_eval) * math.exp(-i / 3) for i in range(12)]
    final = {"l0": L0, "status": "completed", "reason": "", "done": True, "eval_loss": final_eval,
             "train_exact_match": 0.5, "eval_exact_match": 0.1, "forgetting": 0.05, "step": 12,
             "weight_change_by_layer": [{"layer": f"h.{k}", "rel_change": 1e-3 * (k + 1), "changed_fraction": 1.0}
                                        for k in range(4)]}
    return TrialRecord(trial_id=f"t{next(_ids)}", config=_config(method, lr, bs),
                       history=_history(losses, bs, evals={3: losses[3], 7: losses[7], 11: final_eval}), final=final)


def _diverged(method: str, lr: float, bs: int) -> TrialRecord:
    final = {"l0": L0, "status": "diverged", "reason": "non-finite loss (nan) at step 5", "done": True, "eval_loss": L0}
    return TrialRecord(trial_id=f"t{next(_ids)}", config=_config(method, lr, bs),
                       history=_history([3.0, 3.5, 5.0, 9.0], bs), final=final)


def _oscillating(method: str, lr: float, bs: int, final_eval: float) -> TrialRecord:
    """Learns like ``_converged``, then its training loss bounces (its held-out loss can still be good)."""
    record = _converged(method, lr, bs, final_eval)
    losses = [final_eval + (L0 - final_eval) * math.exp(-i / 3) for i in range(12)]
    losses += [final_eval * x for x in (1.0, 3.0, 1.0, 3.2, 1.0, 3.1)]
    record.history = _history(losses, bs, evals={3: losses[3], 17: final_eval})
    return record


def _failed(method: str, lr: float, bs: int) -> TrialRecord:
    return TrialRecord(trial_id=f"t{next(_ids)}", config=_config(method, lr, bs), error=OOM)


def _sweep(root: Path, name: str, records: list[TrialRecord]) -> Path:
    folder = root / name
    folder.mkdir()
    save_records(records, folder / "trials.json")
    return folder


def _report_in_process(folder: Path) -> tuple[int, str, dict]:
    """Exit code, printed output, and the figures the report drew, by the name of the PNG each was saved as."""
    from matplotlib.figure import Figure

    from sweeps.report import main

    drawn, savefig = {}, Figure.savefig

    def keep(fig, fname, *args, **kwargs):  # the figure functions close their figures: keep each to read it back
        drawn[Path(fname).name] = fig
        return savefig(fig, fname, *args, **kwargs)

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "savefig", keep)
        code = main([str(folder)])
    return code, out.getvalue(), drawn


@pytest.fixture(scope="module")
def all_diverged(tmp_path_factory):
    """full diverged at every LR and batch size; lora converged. Run as a user would: a subprocess."""
    records = [_diverged("full", lr, bs) for lr in (1e-4, 1e-3) for bs in (8, 16)]
    records += [_converged("lora", 1e-4, bs, 1.2) for bs in (8, 16)] + [_converged("lora", 1e-3, 8, 1.0)]
    folder = _sweep(tmp_path_factory.mktemp("a"), "all-diverged", records)
    proc = run_cli(["sweeps/report.py", str(folder)], timeout=120)
    return folder, proc.returncode, proc.stdout + proc.stderr, {}  # its figures were drawn in that process


@pytest.fixture(scope="module")
def one_batch_size(tmp_path_factory):
    records = [_converged("full", 1e-5, 8, 1.5), _converged("full", 1e-4, 8, 1.0), _diverged("full", 1e-3, 8),
               _converged("lora", 1e-3, 8, 1.1)]
    folder = _sweep(tmp_path_factory.mktemp("b"), "one-bs", records)
    return (folder, *_report_in_process(folder))


@pytest.fixture(scope="module")
def with_failures(tmp_path_factory):
    """lora failed at every LR (no history); full has one failed trial next to finished ones."""
    records = [_failed("lora", 1e-4, 8), _failed("lora", 1e-3, 8), _failed("full", 1e-3, 8),
               _converged("full", 1e-5, 8, 1.5), _converged("full", 1e-4, 8, 1.0)]
    folder = _sweep(tmp_path_factory.mktemp("c"), "failures", records)
    return (folder, *_report_in_process(folder))


@pytest.fixture(scope="module")
def all_failed(tmp_path_factory):
    folder = _sweep(tmp_path_factory.mktemp("d"), "all-failed", [_failed("full", 1e-4, 8), _failed("lora", 1e-3, 8)])
    return (folder, *_report_in_process(folder))


def test_constructed_curves_classified_as_the_report_does_put_no_unstable_trial_in_a_range_called_good(tmp_path):
    """Curves, not given outcomes: classified on load. Oscillating trials with held-out losses as good as the best sit
    inside and beside the converged ones; no range the findings or the map call good holds one, at either batch size."""
    from sweeps.results.analysis import groups

    records = []
    for bs in (4, 8):
        records += [_converged("full", 1e-4, bs, 1.3), _converged("full", 3e-4, bs, 1.0),
                    _oscillating("full", 1e-3, bs, 1.01), _converged("full", 3e-3, bs, 1.02),
                    _oscillating("full", 1e-2, bs, 1.5), _diverged("full", 3e-2, bs)]
    folder = _sweep(tmp_path, "mixed", records)
    code, output, drawn = _report_in_process(folder)
    assert code == 0
    from sweeps.results.collect import load_folder

    loaded, _ = load_folder(folder)
    assert sorted({r.outcome for r in loaded}) == ["converged", "diverged", "oscillating"]
    for key, trials in groups(loaded).items():
        w = window(trials)
        unstable = [r.learning_rate for r in trials if r.outcome in ("oscillating", "diverged")]
        assert w.well and w.unstable == 1e-3, key
        for lo, hi in w.well:
            assert not [lr for lr in unstable if lo <= lr <= hi], (key, w.well, unstable)
    lines = [ln for ln in output.splitlines() if ln.startswith("- full, batch")]
    assert len(lines) == 2
    for line in lines:
        assert "learns well at 3e-4, 3e-3 (" in line and "instability starts at 1e-3 (oscillating, though 3e-3 above it" in line
    map_ax = _panels(drawn["map.png"])["full"]
    green = [seg for c in map_ax.collections if isinstance(c, matplotlib.collections.LineCollection)
             and matplotlib.colors.to_hex(c.get_color()[0]) == "#2a9d3f" for seg in c.get_segments()]
    assert len(green) == 4, "two single-LR runs per batch size"
    for seg in green:
        (lo, _), (hi, _) = seg
        assert not any(lo <= lr <= hi for lr in (1e-3, 1e-2, 3e-2)), seg


SWEEPS = ["all_diverged", "one_batch_size", "with_failures", "all_failed"]


@pytest.mark.parametrize("sweep", SWEEPS)
def test_report_exits_0_and_writes_every_figure_and_the_html(sweep, request):
    folder, code, output, _ = request.getfixturevalue(sweep)
    assert code == 0, output
    for name in FILES:
        path = folder / "report" / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):  # an image at least the smallest figure's size (4.6 x 3 in, 110 dpi), not blank
            image = matplotlib.image.imread(path)
            assert image.shape[0] >= 300 and image.shape[1] >= 450, (name, image.shape)
            drawn = (image != image[0, 0]).any(axis=-1).mean()  # off the background (the corner's colour)
            assert drawn > 0.01, f"{name}: next to blank ({drawn:.1%} of its pixels drawn on)"
    assert f"report: {folder / 'report' / 'report.html'}" in output


@pytest.mark.parametrize("sweep", SWEEPS)
def test_report_html_is_self_contained(sweep, request):
    folder, _, _, _ = request.getfixturevalue(sweep)
    text = (folder / "report" / "report.html").read_text()
    sources = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", text)
    assert len(sources) == len(FILES) - 1 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script" not in text


def test_report_says_the_method_that_always_diverged_did(all_diverged):
    folder, _, output, _ = all_diverged
    finding = "full: every trial diverged (4/4), even at lr 1e-4: lower the learning-rate range"
    assert f"- {finding}" in output
    assert finding in (folder / "report" / "report.html").read_text()


def test_report_with_one_batch_size_makes_no_batch_size_claim(one_batch_size):
    _, _, output, _ = one_batch_size
    assert "full, batch 8: learns well at 1e-4 (" in output and "diverges between 1e-4 and 1e-3 (10x)" in output
    assert "from batch" not in output and "batch size" not in output


def _panels(figure) -> dict[str, object]:
    """A figure's panels by the method each is titled with (its title's first word)."""
    return {re.split(r"[\s:]", ax.get_title())[0]: ax for ax in figure.axes if ax.get_title()}


def _squares(ax) -> list[tuple[float, str]]:
    """The map panel's trials: (learning rate, outcome by colour), in drawing order."""
    by_color = {matplotlib.colors.to_hex(c): o for o, c in OUTCOME_COLORS.items()}
    return [(c.get_offsets()[0][0], by_color[matplotlib.colors.to_hex(c.get_facecolor()[0])])
            for c in ax.collections if isinstance(c, matplotlib.collections.PathCollection)]


# one_batch_size's trials, as its figures must show them: (lr, outcome, final eval loss; a diverged one at l0)
ONE_BS = {"full": [(1e-5, "converged", 1.5), (1e-4, "converged", 1.0), (1e-3, "diverged", L0)],
          "lora": [(1e-3, "converged", 1.1)]}


def test_report_map_draws_each_trial_at_its_lr_in_its_outcomes_colour_with_its_loss(one_batch_size):
    panels = _panels(one_batch_size[3]["map.png"])
    assert list(panels) == list(ONE_BS)
    for method, trials in ONE_BS.items():
        assert _squares(panels[method]) == [(lr, outcome) for lr, outcome, _ in trials], method
        assert [t.get_text() for t in panels[method].texts] == [f"{loss:.2f}" for *_, loss in trials], method
    assert panels["full"].get_title() == "full"


def test_report_method_panel_draws_final_loss_against_lr_and_marks_the_best(one_batch_size):
    panels = _panels(one_batch_size[3]["methods.png"])
    assert list(panels) == list(ONE_BS)
    for method, trials in ONE_BS.items():
        lines = {line.get_label(): line for line in panels[method].get_lines()}
        assert list(lines["bs 8"].get_xdata()) == [lr for lr, *_ in trials], method
        assert list(lines["bs 8"].get_ydata()) == pytest.approx([loss for *_, loss in trials]), method
        assert list(lines["l0 (base)"].get_ydata()) == [L0, L0]
    best = {m: next(ln.get_xdata()[0] for ln in panels[m].get_lines() if ln.get_label().startswith("best")) for m in ONE_BS}
    assert best == {"full": 1e-4, "lora": 1e-3}


def test_report_curves_draw_every_trials_train_loss_dashed_when_it_diverged(one_batch_size):
    panels = _panels(one_batch_size[3]["curves.png"])
    assert list(panels) == list(ONE_BS)
    for method, trials in ONE_BS.items():
        train = [ln for ln in panels[method].get_lines() if ln.get_linestyle() in ("-", "--")]
        assert [ln.get_linestyle() for ln in train] == ["--" if o == "diverged" else "-" for _, o, _ in trials], method
        # the diverged trial's curve ends at the loss it blew up to (_diverged's last report)
        assert [ln.get_ydata()[-1] for ln in train if ln.get_linestyle() == "--"] == [9.0 for _, o, _ in trials
                                                                                      if o == "diverged"], method
        evals = [ln for ln in panels[method].get_lines() if ln.get_marker() == "o"]
        assert [ln.get_ydata()[-1] for ln in evals] == pytest.approx([loss for _, o, loss in trials if o != "diverged"])


def test_report_figures_of_a_method_that_only_failed_say_so(with_failures):
    drawn = with_failures[3]
    lora = _panels(drawn["map.png"])["lora"]
    assert _squares(lora) == [(1e-4, "failed"), (1e-3, "failed")]
    assert [t.get_text() for t in lora.texts] == ["fail", "fail"]
    assert "lora: no finished trial" in [t.get_text() for ax in drawn["methods.png"].axes for t in ax.texts]
    full = {ln.get_label(): ln for ln in _panels(drawn["methods.png"])["full"].get_lines()}
    assert list(full["bs 8"].get_xdata()) == [1e-5, 1e-4], "the failed trial at 1e-3 has no point"


def test_report_says_which_method_failed_and_why(with_failures):
    folder, _, output, _ = with_failures
    assert f"- lora: all 2 trial(s) failed ({OOM})" in output
    assert f"lora: all 2 trial(s) failed ({OOM})" in (folder / "report" / "report.html").read_text()


def test_report_counts_failed_trials_of_a_method_that_also_finished(with_failures):
    _, _, output, _ = with_failures
    line = next(ln for ln in output.splitlines() if ln.startswith("- full: "))
    assert line.endswith("; 1 failed")


def test_report_table_marks_every_failed_trial_with_its_error(with_failures):
    folder, _, _, _ = with_failures
    text = (folder / "report" / "report.html").read_text()
    assert text.count(">failed</span></td>") == 3
    assert text.count(OOM) >= 3


def test_report_on_an_empty_sweep_is_a_user_error_with_exit_code_2(tmp_path):
    folder = _sweep(tmp_path, "empty", [])
    code, _, _ = _report_in_process(folder)
    assert code == 2


def test_a_method_whose_every_lr_was_slow_is_told_to_raise_the_whole_range():
    records = [_trial("lora", 1e-3, "slow", 2.95), _trial("lora", 3e-2, "slow", 2.9), _trial("full", 1e-3, "converged", 1.0)]
    assert ("lora: every LR tried (lr 1e-3 to 3e-2) learned too little in this budget (gained at most 3% of l0): "
            "raise the learning-rate range or train longer") in diagnose(records)
    assert not any("above the best LR" in f for f in diagnose(records))


def test_pruned_trials_that_had_gained_as_little_count_as_too_low():
    def pruned(lr, loss):  # stopped after its first eval
        return _trial("lora", lr, "pruned", loss, history=_history([3.0, 2.9], 8, evals={1: loss}))

    records = [pruned(1e-4, 5.1 / 5.427 * L0), _trial("lora", 1e-4, "slow", 2.9, bs=4),
               pruned(1e-3, 1.5), _trial("lora", 1e-2, "converged", 0.8)]
    found = [f for f in diagnose(records) if "too low" in f]
    assert found == ["lora: lr 1e-4 too low for this budget (gained at most 6% of l0, against 73% at its best lr 1e-2): "
                     "raise the learning rate or train longer"]


@pytest.mark.parametrize("factor, outcome", [(4.0, "diverged"), (6.0, "oscillating")])
def test_a_sweep_folder_is_classified_with_its_own_specs_divergence_factor(tmp_path, factor, outcome):
    """The factor travels from the YAML (pruning.divergence.factor) through spec.json to the classifier."""
    import json

    from sweeps.results.mlflow_records import load_sweep
    from sweeps.spec import load_spec

    yaml_spec = tmp_path / "s.yaml"
    yaml_spec.write_text(f"name: f\nmodel: tiny\nspace: {{learning_rate: [0.001]}}\n"
                         f"pruning: {{divergence: {{factor: {factor}}}}}\n")
    spec = load_spec(yaml_spec)
    record = _converged("full", 1e-3, 8, 1.0)
    for row in record.history[-4:]:  # the smoothed loss climbs to 5x its minimum: diverged under 4; under 6 it only rebounded
        row["train_loss_ema"] = 5.0 * min(h["train_loss_ema"] for h in record.history)
    folder = _sweep(tmp_path, "f", [record])
    (folder / "spec.json").write_text(json.dumps({"digest": spec.digest(), "spec": spec.model_dump(mode="json")}))
    (loaded,), _ = load_sweep(str(folder))
    assert spec.thresholds().factor == factor
    assert loaded.outcome == outcome, loaded.evidence
