"""Which searched setting mattered, for each objective: Optuna's fANOVA over the finished trials.

The trials are put into an in-memory Optuna study, one per objective, with the values the search chose
(``TrialRecord.params``), so a grid sweep (whose own study only knows a cell index) and a sweep read back
from MLflow get the same answer as a TPE search.

fANOVA (Hutter et al. 2014; a random forest, seeded) rather than Optuna 5's default PED-ANOVA: on synthetic
sweeps of 12 to 30 trials where the forgetting depended on the method alone, PED-ANOVA (top 10% of trials)
named the method first in 1 to 4 of 10 cases, fANOVA in 10 of 10 (tests/sweeps/test_tradeoff.py keeps one such
case). fANOVA only assesses settings every trial has: a conditional one such as ``lora_r`` is left out.

Objectives: the held-out loss over the trials that ran to the end or diverged (a diverged trial counts as
min(loss, l0), as in the LR sensitivity), and the forgetting over the trials that ran to the end (a
stopped trial never measured it). Pruned, failed and unfinished trials are left out.
"""
from __future__ import annotations

from typing import Any

from sweeps.results.analysis import final_loss
from sweeps.results.records import TrialRecord
from sweeps.results.tradeoff import finished, is_number
from sweeps.spec import sampled_settings

# optuna (fANOVA) is imported where importances are computed: reading a sweep's records needs none of it

MIN_TRIALS = 10  # a forest on fewer points says more about the seed than about the settings
IGNORED = ("fault", "seed")  # a test hook, a repeat: not settings whose importance is asked


def objectives(records: list[TrialRecord]) -> dict[str, list[tuple[TrialRecord, float]]]:
    """Each objective's (trial, value) pairs."""
    loss = [(r, final_loss(r)) for r in records if (finished(r) or r.outcome == "diverged")]
    forgetting = [(r, r.final.get("forgetting")) for r in records if finished(r)]
    return {"held-out loss": _finite(loss), "forgetting": _finite(forgetting)}


def importances(records: list[TrialRecord]) -> dict[str, dict[str, float]]:
    """objective -> {setting: importance (sums to 1)}, for objectives with enough trials and >= 2 varied settings."""
    out = {}
    for name, pairs in objectives(records).items():
        params = _searched(r for r, _ in pairs)
        if len(pairs) >= MIN_TRIALS and len(params) >= 2 and len({v for _, v in pairs}) > 1:
            out[name] = _fanova(pairs, params)
    return out


def findings(records: list[TrialRecord], found: dict[str, dict[str, float]]) -> list[str]:
    """``found`` (from ``importances``) in words, or why there is none."""
    out = []
    counts = {name: len(pairs) for name, pairs in objectives(records).items()}
    for name, values in found.items():
        ranked = ", ".join(f"{k} {v:.2f}" for k, v in values.items())
        out.append(f"what mattered for {name} (fANOVA importance over {counts[name]} trials): {ranked}")
    if not found and any(counts.values()):
        out.append(f"parameter importance needs >= {MIN_TRIALS} finished trials that differ in 2 or more settings "
                   f"(this sweep: {max(counts.values())} finished)")
    return out


def _searched(records) -> dict[str, list[Any]]:
    """Setting -> the values trials had for it, for settings every trial has and the search varied."""
    chosen = [_params(r) for r in records]
    keys = [k for k in sampled_settings(chosen[0] if chosen else {}) if k not in IGNORED and all(k in c for c in chosen)]
    seen = {k: [c[k] for c in chosen] for k in keys}
    return {k: v for k, v in seen.items() if len({repr(x) for x in v}) > 1}


def _params(r: TrialRecord) -> dict[str, Any]:
    # records written before ``params`` existed: the config's method, learning rate and batch size
    return r.params or {k: r.config[k] for k in ("method", "learning_rate", "batch_size", "epochs") if k in r.config}


def _distribution(values: list[Any]):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numeric or len(set(values)) <= 3:  # a few listed values (batch size 4, 8) are categories
        return CategoricalDistribution(sorted(set(values), key=repr))
    lo, hi = min(values), max(values)
    log = lo > 0 and hi / lo >= 10
    if all(isinstance(v, int) for v in values):
        return IntDistribution(int(lo), int(hi), log=log)
    return FloatDistribution(float(lo), float(hi), log=log)


def _fanova(pairs: list[tuple[TrialRecord, float]], params: dict[str, list[Any]]) -> dict[str, float]:
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory" per objective
    dists = {k: _distribution(v) for k, v in params.items()}
    study = optuna.create_study(direction="minimize")
    for r, value in pairs:
        chosen = {k: _params(r)[k] for k in dists}
        study.add_trial(optuna.trial.create_trial(params=chosen, distributions=dists, value=value))
    found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    return {k: float(v) for k, v in found.items()}


def _finite(pairs):
    return [(r, float(v)) for r, v in pairs if is_number(v)]
