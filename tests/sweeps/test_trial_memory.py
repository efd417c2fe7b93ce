"""A trial that is stopped mid-run (pruned: Ray's stop surfaces as an exception from the report) leaves nothing of its
model behind for the next trial its reused worker runs: on a GPU, that memory is the next trial's share."""
from __future__ import annotations

import gc

import pytest

from sweeps.launch.trial import releasing
from trainer import TrainConfig, train


class _Stopped(Exception):
    pass


def _live_models() -> int:
    from transformers import PreTrainedModel

    return sum(1 for obj in gc.get_objects() if isinstance(obj, PreTrainedModel))


def test_a_stopped_trial_leaves_no_model_alive(tiny_model_dir):
    cfg = TrainConfig(model="tiny", method="full", max_steps=8, batch_size=4, report_every=4, eval_every=None,
                      forgetting=False, memorization=False)
    before = _live_models()

    def stop_at_second_report(metrics, checkpoint=None):
        if metrics["step"] >= 2:
            raise _Stopped("pruned")

    with pytest.raises(_Stopped) as info:
        releasing(lambda: train(cfg, report=stop_at_second_report))
    assert _live_models() == before, "the stopped trial's model is still referenced"
    del info
