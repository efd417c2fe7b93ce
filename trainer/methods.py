"""The tuning-method registry: which parameters train, what is saved, what changed.

Each method is one small unit with the same shape. The training loop, the export
and the report never branch on a method's name; adding a method is one
``register(...)`` call and one test case (the tests are parametrized over
``METHODS``). Registration order is the order the map and the report show them.

What each method trains:

- ``full``: every parameter. SmolLM2 ties ``lm_head`` to the input embeddings,
  so they are one tensor and train together.
- ``lora``: peft LoRA adapters (rank ``lora_r``, scale ``lora_alpha / lora_r``)
  on ``lora_target_modules`` (default: every linear layer except the head).
  The base weights stay frozen; the adapter is what is saved.
- ``last_layer``: the last ``last_layers`` transformer blocks (all their
  weights: attention, MLP and both norms) plus the final norm. The output head
  is NOT trained: on tied models it is the input embedding matrix, and training
  it would change how every token is read, not only the last layer.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the registry is read by the sweep spec (names only): importing it must not cost torch's 4 s
    import torch
    from torch import nn


@dataclass(frozen=True)
class Method:
    name: str
    prepare: Callable[[nn.Module, object], nn.Module]
    """Freeze/wrap the base model for training; returns the model to train."""
    effective_state: Callable[[nn.Module], dict[str, torch.Tensor]]
    """The weights the tuned model computes with, under the base model's parameter names."""
    peft_args: Callable[[object], dict[str, Any]] | None = None
    """For a method that trains a PEFT adapter: ``peft.LoraConfig(**peft_args(cfg))`` (or the method's own PEFT
    config class) is the adapter it trains. The export writes the same dict as ``<name>_config.json``."""

    @property
    def saves_adapter(self) -> bool:
        """True when ``save`` writes only the adapter (loaded with ``peft``), False for the whole model."""
        return self.peft_args is not None

    def save(self, model: nn.Module, out: Path) -> None:
        """Write the trained artefact to a directory: ``save_pretrained`` writes a peft model's adapter, else the model."""
        model.save_pretrained(out)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    return METHODS[name]


def trainable_summary(model: nn.Module) -> dict[str, float]:
    """Trainable parameter count and fraction of all parameters (peft's base weights included)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total, "trainable_fraction": trainable / max(total, 1)}


# --- full ---------------------------------------------------------------------


def _full_prepare(model: nn.Module, cfg) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


register(Method("full", _full_prepare, _plain_state))


# --- lora ---------------------------------------------------------------------


def _lora_args(cfg) -> dict[str, Any]:
    """``peft.LoraConfig(**this)``: the adapter a trial trains, and what the export writes as lora_config.json."""
    alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha
    return {"r": cfg.lora_r, "lora_alpha": alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": cfg.lora_target_modules, "task_type": "CAUSAL_LM"}


def _lora_prepare(model: nn.Module, cfg) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(**_lora_args(cfg)))


def _lora_effective_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights plus each adapter's delta (as if merged), under base names."""
    from peft.tuners.lora import LoraLayer

    state: dict[str, torch.Tensor] = {}
    base = model.get_base_model()
    for name, param in base.named_parameters():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer", "")] = param.detach()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            weight = module.get_base_layer().weight.detach()
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
            state[f"{name}.weight"] = weight + delta.detach()
    return state


register(Method("lora", _lora_prepare, _lora_effective_state, peft_args=_lora_args))


# --- last_layer ---------------------------------------------------------------


def _blocks(model: nn.Module) -> nn.ModuleList:
    from torch import nn

    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"last_layer needs a decoder with model.layers; {type(model).__name__} has none")
    return layers


def _last_layer_prepare(model: nn.Module, cfg) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    blocks = _blocks(model)
    n = min(cfg.last_layers, len(blocks))
    for block in list(blocks)[-n:]:
        for param in block.parameters():
            param.requires_grad_(True)
    final_norm = getattr(model.model, "norm", None)
    if final_norm is not None:
        for param in final_norm.parameters():
            param.requires_grad_(True)
    return model


register(Method("last_layer", _last_layer_prepare, _plain_state))
