"""The base model's figures (l0, memorization before training, reference NLL), cached per machine.

Every trial of a sweep starts from the same base model and data, so these are
computed once and read from ``$FINETUNE_SWEEPS_CACHE/base_eval/<key>.json``
afterwards. The key hashes the model's files, the tokenized data and the flags
that change the figures, so a changed model or data set is never served stale.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from trainer.metrics import evaluate, reference_set
from trainer.models import cache_root, resolve_model_dir


def get(cfg, model, tokenizer, train_ex, eval_ex, *, device) -> dict:
    """``{"eval": {...}, "train": {...}, "reference_nll": x, "reference_examples": [...]}`` for the base model."""
    fingerprint = _model_fingerprint(cfg.model)
    reference = None
    if cfg.forgetting:
        reference = reference_set(model, tokenizer, cache_root() / "reference" / f"{fingerprint}.json", device=device)
    key = _key(fingerprint, train_ex, eval_ex, cfg)
    path = cache_root() / "base_eval" / f"{key}.json"
    if path.is_file():
        figures = json.loads(path.read_text())
    else:
        kw = dict(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, batch_size=cfg.eval_batch_size, device=device)
        figures = {"eval": evaluate(model, eval_ex, **kw)}
        if cfg.memorization:
            figures["train"] = evaluate(model, train_ex, **kw)
        if reference:
            figures["reference_nll"] = evaluate(model, reference, **kw)["loss"]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(figures))
        tmp.replace(path)
    figures["reference_examples"] = reference
    return figures


def _model_fingerprint(name: str) -> str:
    directory = Path(resolve_model_dir(name))
    h = hashlib.sha256(str(directory.resolve()).encode())
    for f in sorted(directory.glob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _key(fingerprint: str, train_ex, eval_ex, cfg) -> str:
    h = hashlib.sha256(fingerprint.encode())
    for examples in (train_ex, eval_ex):
        for ex in examples:
            h.update(repr((ex.input_ids, ex.target)).encode())
        h.update(b"|")
    h.update(f"{cfg.memorization}:{cfg.forgetting}:{cfg.dtype}".encode())
    if cfg.quantization:  # a 4-bit base computes other figures (kept out of the key otherwise: caches stay valid)
        h.update(cfg.quantization.encode())
    return h.hexdigest()[:24]
