"""``builtin:facts``: question/answer pairs about invented facts no pretrained model knows.

Generated deterministically in code (no download). The train split asks each
question one way; the held-out split asks about the same facts in paraphrase.
A drop in held-out loss or a held-out exact match therefore means the facts
were learned, not the wording.

``builtin:facts`` holds 32 facts; ``builtin:facts:N`` holds N (at most 512).
"""
from __future__ import annotations

import random

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "vr"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m"]
_DEVICES = ["lantern", "compass", "loom", "kettle", "telescope", "clock", "harp", "bicycle", "pump", "printing press"]

# (train question, held-out paraphrase, answer kind); {x} is the invented subject.
_TEMPLATES = [
    ("What is the capital of {x}?", "Which city is the capital of {x}?", "city"),
    ("Who invented the {x}?", "The {x} was invented by whom?", "person"),
    ("In which year was {x} founded?", "When was {x} founded?", "year"),
    ("What is the national animal of {x}?", "Which animal is the national symbol of {x}?", "animal"),
]
_ANIMALS = ["otter", "heron", "lynx", "badger", "falcon", "tortoise", "walrus", "ibis", "jackal", "moose"]
DEFAULT_SIZE = 32
MAX_SIZE = 512


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def facts(n: int = DEFAULT_SIZE, *, heldout: bool = False) -> list[dict[str, str]]:
    """Return ``n`` prompt/completion records; the held-out split paraphrases the same facts."""
    if not 1 <= n <= MAX_SIZE:
        raise ValueError(f"builtin:facts size must be in 1..{MAX_SIZE}, got {n}")
    rng = random.Random(20241122)
    records, seen = [], set()
    while len(records) < n:
        train_q, held_q, kind = _TEMPLATES[len(records) % len(_TEMPLATES)]
        if kind == "person":
            subject = f"{_word(rng, 2).lower()} {rng.choice(_DEVICES)}"
        else:
            subject = _word(rng, 2 + rng.randint(0, 1))
        answer = {
            "city": lambda: _word(rng, 2),
            "person": lambda: f"{_word(rng, 2)} {_word(rng, 2)}",
            "year": lambda: str(rng.randint(1200, 1990)),
            "animal": lambda: rng.choice(_ANIMALS),
        }[kind]()
        if subject in seen:
            continue
        seen.add(subject)
        question = (held_q if heldout else train_q).format(x=subject)
        records.append({"prompt": f"Question: {question}\nAnswer:", "completion": f" {answer}."})
    return records


def parse_builtin(source: str) -> list[dict[str, str]] | None:
    """Records for ``builtin:facts[:N]`` or ``builtin:facts-heldout[:N]``; None if not a builtin name."""
    if not source.startswith("builtin:"):
        return None
    name, _, size = source.removeprefix("builtin:").partition(":")
    if name not in ("facts", "facts-heldout"):
        raise ValueError(f"unknown built-in data set {source!r}; use builtin:facts or builtin:facts-heldout")
    if size and not size.isdigit():
        raise ValueError(f"built-in data set size must be a number, got {source!r}")
    return facts(int(size) if size else DEFAULT_SIZE, heldout=name == "facts-heldout")
