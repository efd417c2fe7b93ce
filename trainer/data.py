"""Training data: JSONL in OpenAI's fine-tuning formats, the built-in facts, tokenization, batches.

Record formats (one JSON object a line):

- ``{"prompt": "...", "completion": "..."}``: the text is prompt + completion +
  EOS; the completion (and EOS) are the target tokens.
- ``{"messages": [{"role": "user", "content": "..."}, ...]}``: rendered with the
  tokenizer's chat template; the assistant turns are the target tokens.

``prompt_loss_weight`` (in the loss, not here) weights the other tokens.
Records longer than ``seq_len`` tokens are truncated at the end, with one
warning saying how many and which line came first.
"""
from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.facts import parse_builtin

_ROLES = {"system", "user", "assistant", "tool", "developer"}


@dataclass(frozen=True)
class Record:
    source: str  # file:line or builtin name:index, for messages
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    target: tuple[bool, ...]  # token is a completion/assistant token (always weight 1)
    source: str


def read_examples(source: str) -> list[Record]:
    """Read and check every record of a JSONL file or built-in data set (UserError naming file:line)."""
    try:
        builtin = parse_builtin(source)
    except ValueError as exc:
        raise UserError(f"data: {exc}") from None
    if builtin is not None:
        return [Record(f"{source}#{i}", r["prompt"], r["completion"]) for i, r in enumerate(builtin)]
    path = Path(source)
    if not path.is_file():
        raise UserError(f"{source}: data file not found")
    records = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                records.append(_parse_line(line, f"{source}:{lineno}"))
    if not records:
        raise UserError(f"{source}: data file is empty (no JSON records)")
    return records


def _parse_line(line: str, where: str) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return Record(where, messages=_parse_messages(obj["messages"], where))
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return Record(where, prompt=obj["prompt"], completion=obj["completion"])
    raise UserError(
        f"{where}: a record needs string keys 'prompt' and 'completion', or a 'messages' list; got keys {sorted(obj)}"
    )


def _parse_messages(messages: object, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or msg.get("role") not in _ROLES:
            raise UserError(
                f"{where}: messages[{i}] must be {{\"role\": one of {sorted(_ROLES)}, \"content\": string}}, got {msg!r}"
            )
        out.append((msg["role"], msg["content"]))
    if not any(role == "assistant" for role, _ in out):
        raise UserError(f"{where}: 'messages' has no assistant turn, so there is nothing to learn")
    return tuple(out)


SPLIT_SEED = 0  # the held-out share is the same for every trial, whatever the trial's own seed
def split_records(
    train: list[Record], eval_source: str | None, eval_fraction: float | None, seed: int = SPLIT_SEED
) -> tuple[list[Record], list[Record]]:
    """The train and eval records: a separate eval source, a held-out fraction, or (neither) the train set."""
    if eval_source:
        return train, read_examples(eval_source)
    if eval_fraction:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(train) * eval_fraction))
        if n_eval >= len(train):
            raise UserError(f"holding out {eval_fraction:.0%} for eval leaves no training records out of {len(train)}: "
                            "give eval data of your own (eval_data, or data.eval in a sweep spec)")
        held = set(order[:n_eval])
        return [r for i, r in enumerate(train) if i not in held], [train[i] for i in sorted(held)]
    warnings.warn("no eval data and eval_fraction=0: eval_loss is measured on the training set", stacklevel=2)
    return train, train


def run_records(cfg) -> tuple[list[Record], list[Record]]:
    """The records a run (a ``TrainConfig``) trains and evaluates on: the split, then the ``max_examples`` cap."""
    train, evaluate = split_records(read_examples(cfg.train_data), cfg.eval_data, cfg.eval_fraction)
    return (train[: cfg.max_examples] if cfg.max_examples else train), evaluate


def tokenize(records: list[Record], tokenizer, seq_len: int, *, name: str = "data") -> list[Example]:
    """Token ids and target masks for each record, truncated to ``seq_len``."""
    examples, truncated = [], []
    for record in records:
        pieces = _pieces(record, tokenizer)
        ids: list[int] = []
        target: list[bool] = []
        for text_ids, is_target in pieces:
            ids.extend(text_ids)
            target.extend([is_target] * len(text_ids))
        if len(ids) > seq_len:
            truncated.append(record.source)
            ids, target = ids[:seq_len], target[:seq_len]
        examples.append(Example(tuple(ids), tuple(target), record.source))
    if truncated:
        warnings.warn(
            f"{name}: {len(truncated)} record(s) longer than seq_len={seq_len} tokens were truncated "
            f"(first: {truncated[0]}); raise seq_len to keep them whole",
            stacklevel=2,
        )
    return examples


def _pieces(record: Record, tokenizer) -> list[tuple[list[int], bool]]:
    if record.messages is None:
        prompt = tokenizer(record.prompt, add_special_tokens=False)["input_ids"]
        completion = tokenizer(record.completion, add_special_tokens=False)["input_ids"]
        prefix = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        return [(prefix + prompt, False), (completion + [tokenizer.eos_token_id], True)]
    return _chat_pieces(record, tokenizer)


def _chat_pieces(record: Record, tokenizer) -> list[tuple[list[int], bool]]:
    """Render growing prefixes of the conversation; assistant turns (after their header) are targets."""
    messages = [{"role": r, "content": c} for r, c in record.messages]
    pieces, done = [], ""
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            header = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            pieces.append((header[len(done):], False))
            done = header
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        pieces.append((full[len(done):], msg["role"] == "assistant"))
        done = full
    return [(tokenizer(text, add_special_tokens=False)["input_ids"], is_target) for text, is_target in pieces if text]


def _adds_bos(tokenizer) -> bool:
    return bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask and target (completion token) mask."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    target = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        mask[row, :n] = 1
        target[row, :n] = torch.tensor(ex.target)
    return {"input_ids": ids, "attention_mask": mask, "target": target}


def example_stream(examples: list[Example], *, seed: int):
    """Endless stream of examples, epoch after epoch, each epoch in a fresh deterministic order.

    Steps take ``batch_size`` examples from the stream, so every step is full and
    ``examples_seen = step * batch_size`` exactly, whatever the data set's size:
    trials with different batch sizes reach the same report points.
    """
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(seed * 100003 + epoch).shuffle(order)
        for i in order:
            yield examples[i]
        epoch += 1
