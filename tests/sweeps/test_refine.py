"""Refinement: the edge finder on constructed groups, then real sweeps on the tiny model (Ray, Optuna, MLflow).

The sweeps: a grid of two learning rates, 0.01 (the tiny model learns) and 10 (its training loss blows up),
refined for two rounds. The first refinement trial must be the geometric midpoint 0.316 (the edge bisected);
no LR runs twice; the refinement trials have their MLflow runs, tagged; and a sweep interrupted in the middle
of refinement and resumed ends with the same learning rates as one that ran straight through.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweeps.results.edges import Point, edge, geo_mid, optimum, proposals
from tests.conftest import ROOT, run_cli

# --- the edge finder ---------------------------------------------------------------------------------------------


def _valley(lr: float, best: float, diverges: float) -> Point:
    """A group's trial: a parabola in log LR around ``best``, diverged at ``diverges`` and above."""
    if lr >= diverges:
        return Point(lr, True)
    return Point(lr, False, 1.0 + (math.log10(lr) - math.log10(best)) ** 2)


def test_a_decade_grid_gives_the_edge_midpoint_and_both_sides_of_the_optimum():
    pts = [_valley(lr, 1e-3, 5e-3) for lr in (1e-5, 1e-4, 1e-3, 1e-2)]
    assert edge(pts).below == 1e-3 and edge(pts).above == 1e-2
    assert optimum(pts).best == 1e-3 and optimum(pts).within == pytest.approx(math.sqrt(10), rel=1e-3)
    # the edge's midpoint and the optimum's upper side are the same LR: proposed once, for both reasons
    assert proposals(pts) == [(0.000316, "optimum"), (0.00316, "edge+optimum")]


def test_nothing_is_proposed_twice_or_once_precise_enough():
    pts = [Point(1e-3, False, 1.0), Point(1.5e-3, True), Point(7e-4, False, 1.2), Point(1.3e-3, False, 1.1)]
    assert proposals(pts) == []  # edge 1.3e-3 .. 1.5e-3 (1.15x); the optimum's sides within 2x
    tried = [Point(1e-3, False, 1.0), Point(1e-2, True), Point(0.00316, False, 2.0)]
    assert all(abs(lr - 0.00316) > 1e-6 for lr, _ in proposals(tried))


# the last two: the edge above the grid's range, and the optimum below it (refinement steps past the range)
@pytest.mark.parametrize("best, diverges", [(1e-3, 5e-3), (2.2e-4, 7e-3), (4e-3, 4.5e-3), (1.3e-4, 3e-2),
                                            (1e-3, 2e-1), (3e-6, 5e-3)])
def test_two_rounds_from_a_decade_grid_locate_edge_and_optimum_within_2x(best, diverges):
    pts = [_valley(lr, best, diverges) for lr in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)]
    for _ in range(2):
        pts += [_valley(lr, best, diverges) for lr, _ in proposals(pts)]
    e, o = edge(pts), optimum(pts)
    assert e.below < diverges <= e.above and e.ratio <= 2
    lo, hi = o.bracket
    assert lo <= best <= hi and o.within <= 2
    assert len({p.lr for p in pts}) == len(pts), "no LR tried twice"


def test_a_range_with_no_edge_or_its_best_at_an_end_is_stepped_past():
    stable = [Point(lr, False, loss) for lr, loss in ((1e-5, 4.0), (1e-4, 2.0), (1e-3, 1.0), (1e-2, 1.5))]
    assert proposals(stable) == [(0.000316, "optimum"), (0.00316, "optimum"), (0.0316, "edge")]
    rising = [Point(lr, False, loss) for lr, loss in ((1e-5, 1.0), (1e-4, 2.0), (1e-3, 3.0))] + [Point(1e-2, True)]
    assert (3.16e-6, "optimum") in proposals(rising)
    assert proposals([Point(1e-3, True), Point(1e-2, True)]) == [(0.000316, "edge")]
    assert proposals([Point(1e-3, False, 1.0)]) == [], "one LR: no gap to step by"


def test_the_grid_is_handed_out_longest_trials_first():
    from sweeps.launch.space import longest_first

    cells = [{"method": m, "batch_size": b, "learning_rate": lr}
             for m in ("last_layer", "lora", "full") for b in (8, 4) for lr in (1e-2, 1e-4)]
    order = [(cells[i]["method"], cells[i]["batch_size"], cells[i]["learning_rate"]) for i in longest_first(cells)]
    assert order[:3] == [("full", 4, 1e-4), ("full", 8, 1e-4), ("full", 4, 1e-2)]  # batch sizes take turns
    assert order[-1] == ("last_layer", 8, 1e-2)


def _study_with(trials: list[tuple[str, float, TrialState, dict]]):
    """An in-memory study holding grid trials: (method, lr, state, extra user attributes)."""
    from optuna.distributions import FloatDistribution

    study = optuna.create_study()
    for method, lr, state, extra in trials:
        attrs = {"method": method, "learning_rate": lr, **extra}
        study.add_trial(optuna.trial.create_trial(
            state=state, value=1.0 if state == TrialState.COMPLETE else None, user_attrs=attrs,
            params={"learning_rate": lr}, distributions={"learning_rate": FloatDistribution(1e-5, 100.0, log=True)}))
    return study


def test_a_group_refines_as_soon_as_its_own_grid_is_done_before_the_rest_of_the_grid(tmp_path):
    """The tail of a sweep: a group's rounds are a chain, so they start as soon as its grid is done, not after
    every other group's grid; the group with more rounds still to run goes first."""
    from sweeps.launch.refine import ASK, GRID, Refiner
    from sweeps.spec import load_spec

    spec = load_spec(_spec(tmp_path, "early"), ["space.method=[full,lora]"])
    refiner = Refiner(spec, n_grid=4)
    assert refiner.grid_sizes == {(("method", "full"),): 2, (("method", "lora"),): 2}
    done = TrialState.COMPLETE
    # full's two grid trials are done, lora's are not yet handed out: full refines now
    study = _study_with([("full", 0.01, done, {}), ("full", 10.0, done, {"outcome": "diverged"})])
    assert refiner.step(study) == ASK
    waiting = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    assert waiting and all(t.user_attrs["method"] == "full" and t.user_attrs["refine"] == 1 for t in waiting)
    # one of full's grid trials still runs: nothing to refine yet, the grid goes on
    study = _study_with([("full", 0.01, done, {}), ("full", 10.0, TrialState.RUNNING, {})])
    assert refiner.step(study) == GRID
    # a cap on refinement trials keeps the old order (the grid first), so the cap's share does not depend on timing
    capped = Refiner(load_spec(_spec(tmp_path, "capped"), ["space.method=[full,lora]",
                                                              "search.refine.max_trials=2"]), n_grid=4)
    study = _study_with([("full", 0.01, done, {}), ("full", 10.0, done, {"outcome": "diverged"})])
    assert capped.step(study) == GRID


# --- real sweeps ---------------------------------------------------------------------------------------------------

def _spec(tmp_path: Path, name: str, extra: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""name: {name}
model: tiny
data: {{train: "builtin:facts:16", eval: "builtin:facts-heldout:16"}}
train: {{epochs: 2, batch_size: 4, seq_len: 48, report_every: 4, eval_every: 16, memorization: false,
        forgetting: false, method: full}}
search: {{algorithm: grid, max_concurrent: 1, refine: {{rounds: 2}}}}
space:
  learning_rate: [0.01, 10.0]
pruning: {{rule: none, divergence: {{min_reports: 2}}}}
failure: {{max_retries: 1, checkpoint_every: 0}}
output_dir: {tmp_path / 'out'}
{extra}""")
    return path


def _trials(tmp_path: Path, name: str) -> list[dict]:
    return json.loads((tmp_path / "out" / name / "trials.json").read_text())


def _lrs(trials: list[dict]) -> list[float]:
    return sorted(t["config"]["learning_rate"] for t in trials)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("refine")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    spec = _spec(tmp, "refine")
    proc = run_cli(["sweeps/run.py", str(spec)], timeout=900, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, uri, proc.stdout


@pytest.mark.slow
def test_dry_run_says_what_refinement_adds(tmp_path, tiny_model_dir):
    proc = run_cli(["sweeps/run.py", str(_spec(tmp_path, "dry")), "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert "refinement: then up to 2 round(s) per the sweep" in proc.stdout
    assert "at most 6 more trial(s)" in proc.stdout
    plain = run_cli(["sweeps/run.py", str(_spec(tmp_path, "plain")), "--dry-run", "search.refine=null"])
    assert plain.returncode == 0 and "refinement" not in plain.stdout, "off unless the spec asks for it"


@pytest.mark.slow
def test_refinement_trials_follow_the_grid_and_bisect_the_edge(straight):
    tmp, uri, out = straight
    trials = _trials(tmp, "refine")
    grid = [t for t in trials if t["refine"] is None]
    refined = [t for t in trials if t["refine"] is not None]
    assert _lrs(grid) == [0.01, 10.0]
    assert refined, "refinement proposed trials after the grid"
    # round 1: the edge's midpoint, which is also the optimum's upper side (proposed once)
    # and, the best (0.01) being the lowest LR tried, a step below the range: 0.01 * sqrt(0.01 / 10)
    assert _lrs([t for t in refined if t["refine"] == 1]) == [pytest.approx(3.16e-4), pytest.approx(geo_mid(0.01, 10.0))]
    assert min(t["final"]["start_unix"] for t in refined) > max(t["final"]["start_unix"] for t in grid)
    assert {t["refine"] for t in refined} <= {1, 2}
    assert len(set(_lrs(trials))) == len(trials), "no learning rate proposed twice"
    by_lr = {t["config"]["learning_rate"]: t for t in trials}
    assert by_lr[10.0]["outcome"] == "diverged" and by_lr[0.01]["outcome"] != "diverged"
    # each round-2 LR is a geometric midpoint of two LRs the group had tried before it, or a step past their range
    earlier = [0.01, 10.0] + [t["config"]["learning_rate"] for t in refined if t["refine"] == 1]
    (a0, a1), (b1, b0) = sorted(earlier)[:2], sorted(earlier)[-2:]
    allowed = [geo_mid(a, b) for a in earlier for b in earlier if a < b] + [a0 * math.sqrt(a0 / a1), b0 * math.sqrt(b0 / b1)]
    for t in refined:
        if t["refine"] == 2:
            lr = t["config"]["learning_rate"]
            assert any(abs(x / lr - 1) < 0.01 for x in allowed), lr
    # each of the 2 rounds bisects the edge (in log LR): from the grid's 1000x to sqrt(1000) = 32x, then to within
    # 1000 ** (1/4) = 5.6x (1% for geo_mid's 3 significant digits). The finding reports the edge the trials give
    e = edge([Point(t["config"]["learning_rate"], t["outcome"] == "diverged") for t in trials])
    assert e.below and e.above and e.ratio <= 1000 ** (1 / 2**2) * 1.01, e
    finding = next(line for line in out.splitlines() if "diverges between" in line)
    assert finding.startswith("  - full: ") and f"{e.text()};" in finding, finding
    # MLflow: one child run per trial, the refinement ones tagged with their round
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("refine")
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == len(trials)
    assert sorted(int(r.data.tags["refine"]) for r in children if "refine" in r.data.tags) == sorted(t["refine"] for t in refined)
    # Optuna: the same trials, the refinement ones enqueued with their round and reason
    study = optuna.load_study(study_name="refine", storage=f"sqlite:///{tmp / 'out' / 'refine' / 'optuna.db'}")
    asked = [t for t in study.trials if "refine" in t.user_attrs]
    assert len(asked) == len(refined) and all(t.user_attrs["why"] for t in asked)
    assert all(t.user_attrs.get("outcome") for t in study.trials)


@pytest.mark.slow
def test_resume_in_the_middle_of_refinement_ends_as_a_straight_run(straight, tmp_path):
    _, _, _ = straight
    spec = _spec(tmp_path, "refine")  # the same spec (and name) as the straight run, in its own folder
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir = tmp_path / "out" / "refine"
    # Ctrl-C as a user presses it. SIGINT's handler is reset in the child: a shell that runs the tests in the
    # background starts them with SIGINT ignored, and the child would inherit that
    proc = subprocess.Popen([sys.executable, "sweeps/run.py", str(spec)], cwd=ROOT, text=True, start_new_session=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        # as soon as the driver starts the first refinement trial: it and round 2 (a few seconds each) are still
        # ahead. (Not the trial folders: Ray writes them beside the driver only at the end.)
        for line in proc.stdout:
            seen.append(line)
            if " start " in f" {line}" and "(refine 1)" in line:
                break
        assert any("(refine 1)" in line for line in seen), "no refinement trial started:\n" + "".join(seen[-40:])
        os.kill(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "--resume" in rest and "Traceback" not in rest, rest[-3000:]
    assert _done(sweep_dir) < len(_trials(straight[0], "refine")), "the sweep was stopped in the middle of refinement"
    again = run_cli(["sweeps/run.py", str(spec), "--resume"], timeout=900, env={"MLFLOW_TRACKING_URI": uri})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "the sweep stopped with" not in again.stdout, again.stdout[-3000:]  # it finished its refinement
    assert "could not be logged" not in again.stdout, again.stdout[-3000:]
    resumed = _trials(tmp_path, "refine")
    assert _lrs(resumed) == _lrs(_trials(straight[0], "refine")), "the same LRs as a straight run: none lost, none twice"
    assert all(t["final"].get("done") for t in resumed)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("refine")
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == len(resumed) == len({c.data.tags["trial_id"] for c in children})


def _done(sweep_dir: Path) -> int:
    try:
        return sum(1 for d in sweep_dir.glob("run_trial_*/result.json") if '"done": true' in d.read_text())
    except OSError:
        return 0
