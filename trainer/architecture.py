"""Where a causal LM keeps its decoder blocks and final norm, whatever its family.

transformers names them differently in every family: Llama, Qwen2, Mistral,
Gemma keep ``model.layers`` and ``model.norm``; GPT-2 ``transformer.h`` and
``transformer.ln_f``; GPT-NeoX/Pythia ``gpt_neox.layers`` and
``gpt_neox.final_layer_norm``; OPT ``model.decoder.layers`` and
``model.decoder.final_layer_norm``. No family is named here: the blocks are
found by shape (``decoder_blocks``), the final norm next to them by the few
names the families give it (``final_norm``).

``meta_model`` builds a model on the ``meta`` device from its config: no
weights are read, so it takes about a second even for an 8B model.
``trainer.methods.check_method_supports`` shows it to each method's
``Method.check`` before a sweep or a run starts, so a model a method cannot
tune is one clear UserError, not a traceback in every trial.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm", "norm_f")
"""What the families call the norm applied after the last block (in this order of preference)."""


def _base(model: nn.Module) -> nn.Module:
    """A peft model's base model (so names are the base model's parameter names), else the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks of a causal LM: ``(qualified name, ModuleList)``, e.g. ``("transformer.h", ...)`` on GPT-2.

    The blocks are the ``torch.nn.ModuleList`` that holds as many modules as the config has layers
    (``config.num_hidden_layers``; ``n_layer`` and the like map onto it); where no list has that length, or the
    config does not say, the lists whose children are all of one type. Of several candidates the one with the
    most parameters wins (a block's own lists, such as MoE experts, are inside it and smaller). A peft model is
    searched in its base model, so the name is the base model's (what ``Method.effective_state`` uses).

    Raises LookupError, saying why, when the model has no such list (blocks in an ``nn.Sequential``, say).
    """
    from torch import nn

    model = _base(model)
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module)]
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [(name, m) for name, m in lists if len(m) == n_layers]
    if not candidates:
        candidates = [(name, m) for name, m in lists if len({type(child) for child in m}) == 1]
    if not candidates:
        counted = f"of {n_layers} modules (config.num_hidden_layers) or " if n_layers else ""
        raise LookupError(f"{type(model).__name__} has no torch.nn.ModuleList {counted}of modules of one type")
    return max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def final_norm(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The norm applied after the last decoder block, ``(qualified name, module)``; None if the model has none.

    It is the child of the blocks' parent (or of that parent's parent) named one of ``FINAL_NORM_NAMES``
    (``model.norm``, ``transformer.ln_f``, ``gpt_neox.final_layer_norm``...). Failing that, a module of a norm
    class (its class name says "Norm") that the parent registers after the blocks, if there is exactly one.
    Raises LookupError where ``decoder_blocks`` does.
    """
    model = _base(model)
    blocks_name, _ = decoder_blocks(model)
    parts = blocks_name.split(".")
    for depth in (len(parts) - 1, len(parts) - 2):
        if depth < 0:
            continue
        parent_name = ".".join(parts[:depth])
        parent = model.get_submodule(parent_name)
        children = dict(parent.named_children())
        prefix = f"{parent_name}." if parent_name else ""
        for name in FINAL_NORM_NAMES:
            if name in children:
                return prefix + name, children[name]
        if depth == len(parts) - 1:
            after = list(children)[list(children).index(parts[-1]) + 1:]
            norms = [name for name in after if "norm" in type(children[name]).__name__.lower()]
            if len(norms) == 1:
                return prefix + norms[0], children[norms[0]]
    return None


def meta_model(model_dir: str | Path, *, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``model_dir`` built from its config on the ``meta`` device: its structure, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
