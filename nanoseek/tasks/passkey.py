"""The built-in long-document corpus: pass-key retrieval over a haystack of the built-in corpus's documents.

A key is planted at a random depth of a long document and asked for at its very end, the passkey task of
Mohtashami & Jaggi ("Landmark Attention", arXiv 2305.16300, §4.2) that long-context work since reports
(YaRN, arXiv 2309.00071, §4.3). Answering needs one token far back, which a model with a short or broken
context, or a sparse attention that drops the key, cannot reach.

Held out the way the task problems are: a hash of the key decides its split (one key in eight is held out),
training documents plant only training keys and held-out ones only held-out keys, and the two draw their
haystack from disjoint seeds. No pattern a model could learn tells the two key sets apart.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

from . import EVAL_SEED_OFFSET
from .corpus import CorpusMix, generate_corpus

KEY_DIGITS = 5
# '#' is in no haystack document: the token before the key marks it, so that finding the key is one lookup
# far back (an induction head's), not a parse of the sentence; the byte-level BPE keeps it apart from the digits.
PLANT = "The pass key is #{key}. Remember it. #{key} is the pass key.\n\n"
QUESTION = "What is the pass key? The pass key is #"
ANSWER = "{key}"  # the tokens scored
SEPARATOR = "\n\n"
_HAYSTACK_DOCUMENTS = 1 << 40  # generate_corpus is lazy: the haystack is as long as a document needs


def held_out_key(key: int) -> bool:
    """Whether `key` belongs to the held-out split: one key in eight, by a hash."""
    return hashlib.sha256(f"passkey:{key}".encode()).digest()[0] < 32


def draw_key(rng: random.Random, split: str) -> int:
    """A KEY_DIGITS-digit key of the split ("train" or "eval")."""
    if split not in ("train", "eval"):
        raise ValueError(f"split = {split!r}: must be 'train' or 'eval'")
    while True:
        key = rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS)
        if held_out_key(key) == (split == "eval"):
            return key


@dataclass(frozen=True)
class PasskeyDocument:
    """A haystack with the key planted before haystack document `depth`, then the question and answer."""

    haystack: tuple[str, ...]
    depth: int
    key: int

    @property
    def prompt(self) -> str:
        """Everything before the answer."""
        before, after = self.haystack[: self.depth], self.haystack[self.depth:]
        parts = [*before, PLANT.format(key=self.key), *after]
        return "".join(p if p.endswith(SEPARATOR) else p + SEPARATOR for p in parts) + QUESTION

    @property
    def answer(self) -> str:
        return ANSWER.format(key=self.key)

    @property
    def text(self) -> str:
        return self.prompt + self.answer + ".\n"

    @property
    def relative_depth(self) -> float:
        """Where the key sits, 0 (first) to 1 (last, next to the question)."""
        return self.depth / max(1, len(self.haystack))


@dataclass(frozen=True)
class Haystack:
    """What the haystack is made of: the built-in corpus's tasks (default all), difficulties and mix."""

    tasks: tuple[str, ...] | None = None
    difficulties: tuple[int, int] = (1, 3)
    mix: CorpusMix = CorpusMix()


def haystack(seed: int, split: str, kind: Haystack = Haystack()) -> Iterator[str]:
    """The split's endless stream of haystack documents (built-in corpus documents, disjoint seeds)."""
    offset = EVAL_SEED_OFFSET if split == "eval" else 0
    low, high = kind.difficulties
    return generate_corpus(_HAYSTACK_DOCUMENTS, offset + seed, high, list(kind.tasks) if kind.tasks else None,
                           kind.mix, low)


def passkey_documents(count: int, seed: int = 0, chars: tuple[int, int] = (2_000, 24_000), split: str = "train",
                      kind: Haystack = Haystack()) -> Iterator[PasskeyDocument]:
    """`count` documents whose haystacks run to a length drawn uniformly from `chars` (characters), each with a
    key at a uniform depth; the same ones for the same arguments."""
    low, high = chars
    if not 0 < low <= high:
        raise ValueError(f"--corpus-doc-chars {low},{high}: need 0 < min <= max")
    rng, stream = random.Random(f"passkey:{split}:{seed}"), haystack(seed, split, kind)
    for _ in range(count):
        budget, parts, size = rng.randint(low, high), [], 0
        while size < budget:
            parts.append(next(stream))
            size += len(parts[-1]) + len(SEPARATOR)
        yield PasskeyDocument(tuple(parts), rng.randint(0, len(parts)), draw_key(rng, split))


def generate_passkey_corpus(documents: int, seed: int = 0, chars: tuple[int, int] = (2_000, 24_000),
                            kind: Haystack = Haystack()) -> Iterator[str]:
    """The training corpus: `documents` passkey documents as text."""
    return (d.text for d in passkey_documents(documents, seed, chars, "train", kind))


def parse_chars(text: str) -> tuple[int, int]:
    """A --corpus-doc-chars value ("2000,24000")."""
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError as exc:
        raise ValueError(f"--corpus-doc-chars {text!r}: two comma-separated integers, MIN,MAX") from exc
    if not 0 < low <= high:
        raise ValueError(f"--corpus-doc-chars {text!r}: need 0 < MIN <= MAX")
    return low, high
