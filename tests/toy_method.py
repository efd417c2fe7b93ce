"""A method of our own, in one file: ``norms_only`` trains the RMSNorm weights and nothing else.

Nothing in the project names it. ``FINETUNE_SWEEPS_METHODS=tests.toy_method`` makes the sweep's driver and
every Ray worker import this module, which registers it (see ``trainer.methods``); the sweep test
(``tests/sweeps/test_extension_method.py``) runs it through a real sweep. It owns no settings, saves the whole
model (the default ``save``), and its weights are the model's own, so ``effective_state`` is the plain one.
"""
from __future__ import annotations

from trainer.methods import Method, register

NAME = "norms_only"


def _prepare(model, cfg):
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith("norm.weight"))  # ...input_layernorm.weight, model.norm.weight
    return model


def _effective_state(model):
    return {name: p.detach() for name, p in model.named_parameters()}


register(Method(NAME, _prepare, _effective_state, cost=1.0))
