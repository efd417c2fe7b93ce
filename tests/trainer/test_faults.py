"""A non-finite loss, an exploding run and an out-of-memory error end the run with a status, never a crash."""
from __future__ import annotations

import math
import threading
import time

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


def test_explode_blows_the_loss_up_and_without_a_stop_rule_the_run_goes_on_to_its_end(tiny_model_dir):
    """explode@2 trains at lr 10 from step 2: the loss blows up but stays finite, and with no stop_factor the trainer
    stops only on a non-finite loss, so the run completes; judging it diverged is the sweep's stop rule's job."""
    result, reports = _run("explode@2")
    assert result.status == "completed" and result.reason == ""
    assert [r["step"] for r in reports] == list(range(1, 13)), "a report per step, to the last"
    losses = [r["train_loss"] for r in reports]
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[2:]) > 10 * max(losses[:2]), "every loss after the step at lr 10 is 10x any before it"


def test_hang_goes_silent_at_its_step_but_not_when_resumed(tiny_model_dir, tmp_path):
    """hang@K stands for a dead data loader: alive, no report; a retry resumed from a checkpoint gets past it."""
    reports = []

    def report(metrics, checkpoint=None):
        reports.append(metrics)
        if metrics["step"] == 2:
            checkpoint(str(tmp_path))

    cfg = TrainConfig(model="tiny", method="full", learning_rate=1e-3, max_steps=6, batch_size=4, report_every=4,
                      eval_every=None, fault="hang@3", memorization=False, forgetting=False)
    hung = threading.Thread(target=train, args=(cfg, report), daemon=True)  # left asleep; it dies with the process
    hung.start()
    deadline = time.monotonic() + 120
    while not (reports and reports[-1]["step"] == 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)
    assert hung.is_alive() and [r["step"] for r in reports] == [1, 2]
    result = train(cfg, lambda m, checkpoint=None: None, resume_from=tmp_path)
    assert result.status == "completed" and result.metrics["resumed_from_step"] == 2
