"""A non-finite loss, an exploding run and an out-of-memory error end the run with a status, never a crash."""
from __future__ import annotations

import math

from trainer import TrainConfig, train


def _run(fault: str, **kw):
    reports = []
    cfg = TrainConfig(model="tiny", method="full", learning_rate=1e-3, max_steps=12, batch_size=4, report_every=4,
                      eval_every=None, fault=fault, memorization=False, forgetting=False, **kw)
    return train(cfg, report=lambda m, checkpoint=None: reports.append(m)), reports


def test_nan_loss_stops_as_diverged_with_step(tiny_model_dir):
    result, reports = _run("nan@3")
    assert result.status == "diverged"
    assert "step 3" in result.reason and "non-finite" in result.reason
    assert reports[-1]["status"] == "diverged"
    assert all(math.isfinite(v) for r in reports for v in r.values() if isinstance(v, float))
    assert reports[-1]["eval_loss"] <= reports[-1]["l0"]  # objective = min(last eval loss, l0)


def test_injected_oom_fails_with_reason(tiny_model_dir):
    result, _ = _run("oom@2")
    assert result.status == "failed"
    assert result.reason == "out of memory at step 2"


def test_explode_blows_the_loss_up(tiny_model_dir):
    result, reports = _run("explode@2")
    losses = [r.get("train_loss", math.inf) for r in reports]
    assert result.status == "diverged" or max(losses) > 4 * min(losses)
