"""``builtin:facts``: question/answer pairs about invented facts no pretrained model knows.

Generated deterministically in code (no download). The train split asks each
question one way; the held-out split asks about the same facts in paraphrase.
A drop in held-out loss or a held-out exact match therefore means the facts
were learned, not the wording.

``builtin:facts`` holds 32 facts; ``builtin:facts:N`` holds N (at most 512).

``builtin:facts-long`` (and ``facts-long-heldout``) are the same facts behind a long prompt: a background passage
of about 70 tokens about invented places and people that never states the answer, then the question. The prompt
(about 90 tokens) is about 15x the completion (about 6 with the EOS), so ``prompt_loss_weight`` decides where most
of the loss is (``prompt_loss.yaml``). The held-out split has other passages (fresh invented words) and the
paraphrased questions.
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
    return [record for record, _ in _facts(n, heldout)]


def _facts(n: int, heldout: bool) -> list[tuple[dict[str, str], str]]:
    """Each record with its invented subject."""
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
        records.append(({"prompt": f"Question: {question}\nAnswer:", "completion": f" {answer}."}, subject))
    return records


_TERRAIN = ["marshes", "terraced hills", "salt flats", "pine forests", "river islands", "chalk cliffs", "red canyons"]
_GOODS = ["copper wire", "dyed wool", "dried figs", "glass beads", "lamp oil", "river pearls", "cedar planks"]
_MOODS = ["muddy", "dusty", "quiet", "crowded", "icy", "flooded", "busy"]
_TOPICS = ["old mills", "festivals", "bridges", "bell towers", "dialects", "tax records", "ferries"]


def _background(rng: random.Random, subject: str) -> str:
    """A passage about ``subject`` and other invented names that never states the answer (about 70 tokens)."""
    w = [_word(rng, 2) for _ in range(5)]
    sentences = [
        f"mentions {subject} together with {w[0]}, {w[1]} and {w[2]}, places known for their {rng.choice(_TERRAIN)}.",
        f"The roads between them are {rng.choice(_MOODS)} in spring and {rng.choice(_MOODS)} in autumn.",
        f"Traders from {w[3]} carry {rng.choice(_GOODS)} there, and scholars in {w[4]} have written long letters about "
        f"its {rng.choice(_TOPICS)}.",
    ]
    return "Background: an old gazetteer " + " ".join(sentences)


def long_facts(n: int = DEFAULT_SIZE, *, heldout: bool = False) -> list[dict[str, str]]:
    """``facts(n)`` behind a long background passage (other passages, with fresh names, in the held-out split)."""
    rng = random.Random(7 + heldout)
    out = []
    for record, subject in _facts(n, heldout):
        subject = f"the {subject}" if " " in subject else subject  # "the saerta bicycle"
        out.append({"prompt": f"{_background(rng, subject)}\n{record['prompt']}", "completion": record["completion"]})
    return out


BUILTINS = {"facts": facts, "facts-long": long_facts}  # each with its held-out split, NAME-heldout


def heldout_of(source: str) -> str | None:
    """The held-out split of a built-in training set (``builtin:facts:16`` -> ``builtin:facts-heldout``); None otherwise."""
    if not source.startswith("builtin:"):
        return None
    name = source.removeprefix("builtin:").partition(":")[0]
    return f"builtin:{name}-heldout" if name in BUILTINS else None


def parse_builtin(source: str) -> list[dict[str, str]] | None:
    """Records for ``builtin:NAME[:N]`` or ``builtin:NAME-heldout[:N]`` (NAME: facts, facts-long); None if not a
    builtin name."""
    if not source.startswith("builtin:"):
        return None
    name, _, size = source.removeprefix("builtin:").partition(":")
    base = name.removesuffix("-heldout")
    if base not in BUILTINS:
        known = ", ".join(f"builtin:{b}, builtin:{b}-heldout" for b in BUILTINS)
        raise ValueError(f"unknown built-in data set {source!r}; use one of {known}")
    if size and not size.isdigit():
        raise ValueError(f"built-in data set size must be a number, got {source!r}")
    return BUILTINS[base](int(size) if size else DEFAULT_SIZE, heldout=name != base)
