"""What fine-tuning changed: losses, memorization, forgetting and weight change.

- Eval loss: mean NLL of the completion (target) tokens of the eval set.
- Memorization: teacher-forced per-token accuracy on completion tokens, and
  greedy exact match. Greedy decoding reproduces a completion exactly iff, at
  every completion position, the argmax given the true prefix is the true
  token; so exact match needs one forward pass, not ``generate``. The EOS after
  a completion is not required (the model may keep talking after the answer).
- Forgetting: mean per-token NLL on a fixed reference set that is not training
  data: the base model's own greedy continuations of generic prompts (fixed,
  cached per model). Its change after training is the forgetting.
- Weight change: per tensor and per block, ||W - W0|| / ||W0|| (LoRA merged).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.data import Example, collate

REFERENCE_PROMPTS = [
    "The history of the Roman Empire",
    "To bake a loaf of bread, you",
    "Photosynthesis is the process by which",
    "The most important rule of writing code is",
    "In the winter, many birds",
    "A good way to learn a new language is",
    "The ocean covers most of the Earth and",
    "When the train left the station,",
]
REFERENCE_TOKENS = 32


def token_nll(
    model, batch: dict[str, torch.Tensor], *, with_correct: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token NLL of predicting token t+1 from its prefix.

    Returns ``(nll, target, valid, correct)``, each shaped [batch, len-1]: the loss,
    whether the predicted token is a completion token, whether it is a real
    (non-pad) token, and whether the argmax prediction equals it (None unless
    ``with_correct``: the training step does not need it).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    # Shift the labels, not the logits: slicing [batch, len, vocab] logits copies them (and their gradient)
    # when flattened; the last position gets label -100 and its NLL is dropped below.
    labels = F.pad(batch["input_ids"][:, 1:], (0, 1), value=-100)
    nll = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), reduction="none", ignore_index=-100)
    nll = nll.view_as(labels)[:, :-1]
    valid = batch["attention_mask"][:, 1:].bool()
    target = batch["target"][:, 1:] & valid
    correct = (logits[:, :-1].argmax(-1) == labels[:, :-1]) if with_correct else None
    return nll, target, valid, correct


def weighted_loss(nll: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, prompt_weight: float) -> torch.Tensor:
    """Mean NLL with completion tokens weighted 1 and the other real tokens ``prompt_weight``."""
    weights = target.float() + prompt_weight * (valid & ~target).float()
    return (nll * weights).sum() / weights.sum().clamp_min(1e-8)


@torch.no_grad()
def evaluate(
    model, examples: list[Example], *, pad_id: int, eos_id: int | None, batch_size: int, device
) -> dict[str, float]:
    """Completion loss, prompt loss, token accuracy and greedy exact match over ``examples``."""
    was_training = model.training
    model.eval()
    sums = {"completion_nll": 0.0, "completion_tokens": 0, "prompt_nll": 0.0, "prompt_tokens": 0, "correct": 0, "exact": 0}
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        nll, target, valid, correct = token_nll(model, batch)
        prompt = valid & ~target
        sums["completion_nll"] += nll[target].sum().item()
        sums["completion_tokens"] += int(target.sum())
        sums["prompt_nll"] += nll[prompt].sum().item()
        sums["prompt_tokens"] += int(prompt.sum())
        sums["correct"] += int((correct & target).sum())
        sums["exact"] += int(_exact_rows(correct, target, batch["input_ids"][:, 1:], eos_id).sum())
    model.train(was_training)
    n_tok = max(sums["completion_tokens"], 1)
    return {
        "loss": sums["completion_nll"] / n_tok,
        "prompt_loss": sums["prompt_nll"] / max(sums["prompt_tokens"], 1),
        "token_accuracy": sums["correct"] / n_tok,
        "exact_match": sums["exact"] / max(len(examples), 1),
    }


def _exact_rows(correct: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """A row matches when every completion token except EOS is the argmax given the true prefix.

    A target token right after an EOS (the newline a chat template puts after ``<|im_end|>``) is never
    produced by greedy decoding, which stops at the EOS, so it is not required either.
    """
    required = target
    if eos_id is not None:
        is_eos = labels == eos_id
        after_eos = torch.zeros_like(is_eos)
        after_eos[:, 1:] = is_eos[:, :-1]
        required = target & ~is_eos & ~after_eos
    return (correct | ~required).all(dim=1) & required.any(dim=1)


# --- forgetting ---------------------------------------------------------------------


def reference_set(model, tokenizer, cache_file: Path | None, *, device) -> list[Example]:
    """The base model's greedy continuations of generic prompts, cached so every trial uses the same text."""
    if cache_file is not None and cache_file.is_file():
        rows = json.loads(cache_file.read_text())
        return [Example(tuple(r["input_ids"]), tuple(r["target"]), "reference") for r in rows]
    examples = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for prompt in REFERENCE_PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=REFERENCE_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )[0].tolist()
            n = ids.shape[1]
            examples.append(Example(tuple(out), tuple([False] * n + [True] * (len(out) - n)), "reference"))
    model.train(was_training)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")  # trials of a sweep may write it at once
        tmp.write_text(json.dumps([{"input_ids": e.input_ids, "target": e.target} for e in examples]))
        tmp.replace(cache_file)
    return examples


# --- weight change ---------------------------------------------------------------------


def materialize(value) -> torch.Tensor:
    """A state's value: the tensor, or what its function computes (a merged LoRA weight, one at a time)."""
    return value() if callable(value) else value


def weight_change(before: dict, after: dict, blocks: str | None = None) -> list[dict]:
    """Per tensor: ||W - W0|| / ||W0||, with the block index it belongs to (None outside blocks).

    Values are tensors or functions computing them (``materialize``); ``before`` may live on another device (the
    CPU snapshot of a GPU run). ``blocks`` is the qualified name of the decoder blocks (``model.layers``,
    ``transformer.h``: ``block_prefix`` reads it from the model); a tensor named ``<blocks>.<N>.…`` belongs to block N.
    None: no tensor is a block's."""
    pattern = re.compile(rf"^{re.escape(blocks)}\.(\d+)\.") if blocks else None
    rows = []
    for name, value in before.items():
        if name not in after:
            continue
        match = pattern.match(name) if pattern else None
        if _same_tensor(after[name], value):  # a frozen weight read in place (LoRA's base): unchanged, not copied
            rows.append({"name": name, "block": int(match.group(1)) if match else None, "numel": value.numel(),
                         "rel_change": 0.0})
            continue
        w = materialize(after[name]).float()
        w0 = materialize(value).to(w.device).float()
        base = w0.norm().item()
        delta = (w - w0).norm().item()
        rows.append(
            {
                "name": name,
                "block": int(match.group(1)) if match else None,
                "numel": w0.numel(),
                "rel_change": delta / base if base > 0 else float(delta > 0),
            }
        )
    return rows


def _same_tensor(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
            and a.shape == b.shape and a.dtype == b.dtype)


def block_prefix(model) -> str | None:
    """The qualified name of ``model``'s decoder blocks under the base model's parameter names (what
    ``weight_change`` groups by); None when ``decoder_blocks`` cannot find them."""
    from trainer.architecture import decoder_blocks

    try:
        return decoder_blocks(model)[0]
    except LookupError:
        return None


def change_by_block(rows: list[dict]) -> list[dict]:
    """Aggregate the table per block: the parameter-weighted mean relative change, and what share changed."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        key = f"block {row['block']}" if row["block"] is not None else row["name"].split(".")[-2]
        groups.setdefault(key, []).append(row)
    out = []
    for key, members in groups.items():
        total = sum(r["numel"] for r in members)
        out.append(
            {
                "layer": key,
                "rel_change": sum(r["rel_change"] * r["numel"] for r in members) / max(total, 1),
                "changed_fraction": sum(r["numel"] for r in members if r["rel_change"] > 1e-7) / max(total, 1),
            }
        )
    return out
