"""The method registry: each method owns what it saves and its PEFT config; nothing else names a method."""
from __future__ import annotations

import pytest

from trainer.config import TrainConfig
from trainer.methods import METHODS, get_method


def test_an_adapter_method_owns_its_peft_config_and_saves_the_adapter():
    from peft import LoraConfig

    cfg = TrainConfig(method="lora", lora_r=4, lora_alpha=8.0, lora_dropout=0.1)
    lora = get_method("lora")
    assert lora.saves_adapter
    built = LoraConfig(**lora.peft_args(cfg))  # what the trial trains and what the export writes, one dict
    assert (built.r, built.lora_alpha, built.lora_dropout) == (4, 8, 0.1)
    assert isinstance(lora.peft_args(cfg)["lora_alpha"], int)


@pytest.mark.parametrize("name", [m for m in METHODS if m != "lora"])
def test_a_whole_model_method_has_no_peft_config(name):
    assert get_method(name).peft_args is None and not get_method(name).saves_adapter


def test_the_report_orders_methods_as_the_registry_does():
    from sweeps.results.analysis import METHOD_ORDER

    assert METHOD_ORDER == tuple(METHODS) == ("full", "lora", "last_layer")
