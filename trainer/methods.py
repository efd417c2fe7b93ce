"""The tuning-method registry: which parameters train, what is saved, what changed.

Each method is one small unit with the same shape. The training loop, the export
and the report never branch on a method's name; adding a method is one
``register(...)`` call and one test case (the tests are parametrized over
``METHODS``). Registration order is the order the map and the report show them.

A method of your own lives in a module of yours that calls ``register(...)``;
name it in ``$FINETUNE_SWEEPS_METHODS`` (comma-separated module paths, e.g.
``FINETUNE_SWEEPS_METHODS=my_methods``). Importing this registry imports those
modules, so every process that reads ``METHODS`` sees them: the driver before
the spec is validated, and every Ray worker (the driver passes the variable in
its runtime env) before a trial's config is. The module must be importable
there (installed, or on ``PYTHONPATH``); ``tests/toy_method.py`` is an example.

What each method trains:

- ``full``: every parameter. SmolLM2 ties ``lm_head`` to the input embeddings,
  so they are one tensor and train together.
- ``lora``: peft LoRA adapters (rank ``lora_r``, scale ``lora_alpha / lora_r``)
  on ``lora_target_modules`` (default: every linear layer except the head).
  The base weights stay frozen; the adapter is what is saved.
- ``last_layer``: the last ``last_layers`` transformer blocks (all their
  weights: attention, MLP and both norms) plus the final norm, found on any
  causal LM by ``trainer.architecture`` (``model.layers`` on Llama,
  ``transformer.h`` on GPT-2...). The output head is NOT trained: on tied
  models it is the input embedding matrix, and training it would change how
  every token is read, not only the last layer.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
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
    effective_state: Callable[[nn.Module], dict[str, State]]
    """The weights the tuned model computes with, under the base model's parameter names. A value may be a function
    that computes the tensor when it is read (``trainer.metrics.materialize``): one merged tensor at a time."""
    base_state: Callable[[nn.Module], dict[str, State]] | None = None
    """For a method whose trainable tensors are not base weights (adapters): the prepared model's frozen base weights,
    under the same names as ``effective_state``. None: the trainer snapshots the trainable parameters themselves."""
    peft_args: Callable[[object], dict[str, Any]] | None = None
    """For a method that trains a PEFT adapter: ``peft.LoraConfig(**peft_args(cfg))`` (or the method's own PEFT
    config class) is the adapter it trains. The export writes the same dict as ``<name>_config.json``."""
    quantized_base: bool = False
    """True when the method trains only adapters on a frozen base, so the base may be 4-bit (``quantization``)."""
    settings: tuple[str, ...] = ()
    """The TrainConfig fields only this method reads (``lora_r``...): labels show them only on its trials."""
    cost: float = 2.0
    """Compute per training example relative to a forward pass: the grid starts the costliest trials first."""
    color: str | None = None
    """Its colour in the figures (None: one from matplotlib's cycle)."""
    check: Callable[[nn.Module], str | None] | None = None
    """Whether it can tune a model: given the model built on the meta device (structure, no weights), a problem in
    words or None. ``check_method_supports`` runs it before a sweep or a run starts."""

    @property
    def saves_adapter(self) -> bool:
        """True when ``save`` writes only the adapter (loaded with ``peft``), False for the whole model."""
        return self.peft_args is not None

    def save(self, model: nn.Module, out: Path) -> None:
        """Write the trained artefact to a directory: ``save_pretrained`` writes a peft model's adapter, else the model."""
        model.save_pretrained(out)


State = "torch.Tensor | Callable[[], torch.Tensor]"  # a weight, or a function that computes it when read

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    return METHODS[name]


def method_cost(name: str | None) -> float:
    """``Method.cost`` of a method by name; a name not registered (a record of another install) counts as 2."""
    method = METHODS.get(name) if name else None
    return method.cost if method else 2.0


EXTENSIONS_ENV = "FINETUNE_SWEEPS_METHODS"


def load_extensions(modules: str | None = None) -> list[str]:
    """Import the method modules named in ``modules`` (default ``$FINETUNE_SWEEPS_METHODS``); their names.

    Importing is what registers their methods; a module already imported is not run again."""
    from trainer.errors import UserError

    names = [m.strip() for m in (os.environ.get(EXTENSIONS_ENV, "") if modules is None else modules).split(",") if m.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UserError(f"${EXTENSIONS_ENV}: cannot import method module {name!r} ({exc}); it must be importable "
                            "(installed, or on PYTHONPATH) in the driver and in every Ray worker") from None
    return names


def trainable_summary(model: nn.Module) -> dict[str, float]:
    """Trainable parameter count and fraction of all parameters (peft's base weights included)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total, "trainable_fraction": trainable / max(total, 1)}


def check_method_supports(methods: str | Iterable[str], model_dir: str | Path, *, model_label: str | None = None,
                          trust_remote_code: bool = False) -> None:
    """Raise UserError if one of ``methods`` cannot tune the model in ``model_dir``.

    Each method's ``Method.check`` reads the model built on the meta device (built once, and only when a method
    has a check). The message names the method and the model (``model_label``, default ``model_dir``):
    ``method last_layer: model M: cannot find the decoder blocks: ...``; callers put the file in front.
    """
    from trainer.architecture import meta_model
    from trainer.errors import UserError

    checks = [(name, get_method(name).check) for name in ([methods] if isinstance(methods, str) else methods)]
    checks = [(name, check) for name, check in checks if check is not None]
    if not checks:
        return
    label = model_label or model_dir
    try:
        model = meta_model(model_dir, trust_remote_code=trust_remote_code)
    except ValueError as exc:  # not a causal LM, or remote code not trusted: transformers says which
        raise UserError(f"model {label}: transformers cannot build it as a causal LM ({str(exc).splitlines()[0]})") from None
    for name, check in checks:
        problem = check(model)
        if problem:
            raise UserError(f"method {name}: model {label}: {problem}")


# --- full ---------------------------------------------------------------------


def _full_prepare(model: nn.Module, cfg) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


register(Method("full", _full_prepare, _plain_state, cost=3.0, color="#1f77b4"))


# --- lora ---------------------------------------------------------------------


def _lora_args(cfg) -> dict[str, Any]:
    """``peft.LoraConfig(**this)``: the adapter a trial trains, and what the export writes as lora_config.json."""
    alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha
    return {"r": cfg.lora_r, "lora_alpha": alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": cfg.lora_target_modules, "task_type": "CAUSAL_LM"}


def _lora_prepare(model: nn.Module, cfg) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(**_lora_args(cfg)))


def _lora_states(model: nn.Module, *, merged: bool) -> dict[str, State]:
    """Base weights under base names; each LoRA layer's weight computed when read: its base weight (dequantized
    when the base is 4-bit), plus the adapters' delta when ``merged``. Nothing is copied up front."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    def weight(module, merged: bool):
        base = dequantize_module_weight(module.get_base_layer()).detach()
        if not merged:
            return base
        return base + sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A).detach()

    state: dict[str, State] = {}
    base = model.get_base_model()
    for name, param in base.named_parameters():
        if "lora_" not in name:
            state[name.replace(".base_layer", "")] = param.detach()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            state[f"{name}.weight"] = lambda module=module: weight(module, merged)
    return state


def _lora_effective_state(model: nn.Module) -> dict[str, State]:
    """Base weights plus each adapter's delta (as if merged), under base names."""
    return _lora_states(model, merged=True)


def _lora_base_state(model: nn.Module) -> dict[str, State]:
    """The frozen base weights the adapters add to, under the same names: nothing to copy, they never change."""
    return _lora_states(model, merged=False)


register(Method("lora", _lora_prepare, _lora_effective_state, base_state=_lora_base_state, peft_args=_lora_args,
                quantized_base=True,
                settings=("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"), cost=2.0, color="#e76f51"))


# --- last_layer ---------------------------------------------------------------


def _last_layer_prepare(model: nn.Module, cfg) -> nn.Module:
    from trainer.architecture import decoder_blocks, final_norm

    for param in model.parameters():
        param.requires_grad_(False)
    _, blocks = decoder_blocks(model)
    n = min(cfg.last_layers, len(blocks))
    for block in list(blocks)[-n:]:
        for param in block.parameters():
            param.requires_grad_(True)
    norm = final_norm(model)
    if norm is not None:
        for param in norm[1].parameters():
            param.requires_grad_(True)
    return model


def _last_layer_check(model: nn.Module) -> str | None:
    from trainer.architecture import decoder_blocks

    try:
        decoder_blocks(model)
    except LookupError as exc:
        return f"cannot find the decoder blocks: {exc}; use method full or lora"
    return None


register(Method("last_layer", _last_layer_prepare, _plain_state, settings=("last_layers",), cost=1.2, color="#2a9d8f",
                check=_last_layer_check))


# Last: the methods of $FINETUNE_SWEEPS_METHODS, registered after the built-in ones (so shown after them). They may
# import this module: it is complete by now.
load_extensions()
