"""Rule-based rewards (spec grpo-r1.md §2.2, §3.2, §9.5): accuracy, format, language consistency and the
overlong penalty, combined with weights. A reward function that raises is logged and scores 0: a bad reward
never stops training. Hardened against the usual hacks: several answers, the answer only inside the think
block, repeated or unbalanced tags, empty and huge outputs all score 0 for accuracy."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .tasks import Problem
from .tasks.check import extract_answer, split_reply

log = logging.getLogger(__name__)
_WORD = re.compile(r"\S+")


@dataclass
class Completion:
    """One sampled reply to a problem, as the rewards see it."""

    problem: Problem
    text: str
    tokens: int
    max_tokens: int
    truncated: bool = False  # stopped by the length limit, not by the model
    opened: bool = True  # the prompt opened the think block


def accuracy(c: Completion) -> float:
    """1 for a single, well-formatted, correct final answer; 0 otherwise (truncated replies included)."""
    return float(not c.truncated and c.problem.check(extract_answer(c.text, c.opened)))


def format_reward(c: Completion) -> float:
    """1 when the reply is a closed think block followed by one short answer (R1's format reward)."""
    return float(not c.truncated and extract_answer(c.text, c.opened) is not None)


def language_consistency(c: Completion) -> float:
    """Share of the reasoning's words written in the target language, here ASCII text (R1 §2.3.2's reward,
    at toy scale: another script in the chain of thought is the other language)."""
    parts = split_reply(c.text, c.opened)
    reasoning = parts[0] if parts is not None else c.text
    words = _WORD.findall(reasoning)
    return sum(w.isascii() for w in words) / len(words) if words else 0.0


def overlong_penalty(c: Completion, cache: int | None = None) -> float:
    """DAPO's soft overlong punishment: 0 up to max - cache tokens, then linearly down to -1 at the limit."""
    cache = cache if cache is not None else max(1, c.max_tokens // 4)
    if c.tokens > c.max_tokens or c.truncated:
        return -1.0
    start = c.max_tokens - cache
    return 0.0 if c.tokens <= start else (start - c.tokens) / cache


REWARDS: dict[str, Callable[[Completion], float]] = {
    "accuracy": accuracy, "format": format_reward, "language": language_consistency, "overlong": overlong_penalty,
}


@dataclass
class RewardSet:
    """A weighted sum of named rewards; `__call__` returns (total, each component)."""

    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    functions: dict[str, Callable[[Completion], float]] = field(default_factory=lambda: dict(REWARDS))

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(self.functions)
        if unknown:
            raise ValueError(f"unknown reward(s) {', '.join(sorted(unknown))}; known: {', '.join(self.functions)}")

    def __call__(self, completion: Completion) -> tuple[float, dict[str, float]]:
        parts = {}
        for name in self.weights:
            try:
                parts[name] = float(self.functions[name](completion))
            except Exception:  # a broken reward scores 0 and is logged, training goes on
                log.exception("reward %r failed on a completion of %r; scoring it 0", name, completion.problem.task)
                parts[name] = 0.0
        return sum(self.weights[n] * v for n, v in parts.items()), parts
