"""Rule-based rewards (DeepSeek-R1 §2.2 and Supplementary §2.3, DAPO §3.4, Spurious Rewards): accuracy,
format, language consistency, the overlong penalty and a random control, combined with weights, plus the
user's own reward functions (`--reward package.module:function`).

Hardened against the usual hacks: several answers, the answer only inside the think block, repeated or
unbalanced tags, empty and huge outputs all score 0 for accuracy. Accuracy, format, language and the random
control are blind to the reply's mode: a direct answer and a reasoned one with the same answer score the
same, so nothing here pays for reasoning or length as such (only `overlong`, by design, looks at length).

A reward that raises or returns garbage is logged and scores 0: a bad reward never stops training.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from numbers import Real
from pathlib import Path
from typing import Any, Protocol

from .r1 import Layout, Reply, layout
from .tasks import Problem

log = logging.getLogger(__name__)
# The columns every user reward gets; a JSONL field of the same name is shadowed by them.
_STANDARD_COLUMNS = ("prompts", "completions", "answer", "task", "truncated")
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
    form: Layout = field(default_factory=lambda: layout("chat"))

    @cached_property
    def reply(self) -> Reply:
        return self.form.parse(self.text, self.opened)


def accuracy(c: Completion) -> float:
    """1 for a single, well-formatted, correct final answer; 0 otherwise (truncated replies included)."""
    return float(not c.truncated and c.problem.check(c.reply.answer))


def format_reward(c: Completion) -> float:
    """1 when the reply has the layout's form (chat: a closed think block, then one short answer; zero: an
    optional think block, then one answer in tags), R1's format reward."""
    return float(not c.truncated and c.reply.answer is not None)


def language_consistency(c: Completion) -> float:
    """Share of the reasoning's words written in the target language, here ASCII text (R1 §2.3.2's reward,
    at toy scale: another script in the chain of thought is the other language). A reply without a think
    block is judged on all its words, so answering directly is neither cheaper nor dearer. A broken or
    truncated reply scores 0, as for accuracy and format: an empty reply is not consistent, only short."""
    if c.truncated or c.reply.answer is None:
        return 0.0
    reasoning = c.reply.reasoning if c.reply.reasoning is not None else c.text
    words = _WORD.findall(reasoning)
    return sum(w.isascii() for w in words) / len(words) if words else 0.0


def overlong_penalty(c: Completion, cache: int | None = None) -> float:
    """DAPO's soft overlong punishment: 0 up to max - cache tokens, then linearly down to -1 at the limit."""
    cache = cache if cache is not None else max(1, c.max_tokens // 4)
    if c.tokens > c.max_tokens or c.truncated:
        return -1.0
    start = c.max_tokens - cache
    return 0.0 if c.tokens <= start else (start - c.tokens) / cache


def random_reward(c: Completion) -> float:
    """A fair coin per reply, blind to correctness (the control of Shao et al., "Spurious Rewards", 2025):
    the same reply to the same question always gets the same flip."""
    digest = hashlib.sha256(f"{c.problem.question}\x00{c.text}".encode()).digest()
    return float(digest[0] & 1)


REWARDS: dict[str, Callable[[Completion], float]] = {
    "accuracy": accuracy, "format": format_reward, "language": language_consistency, "overlong": overlong_penalty,
    "random": random_reward,
}


class BatchReward(Protocol):
    """A user reward function, TRL's signature: called once per group of replies with lists of equal length
    and keyword arguments, returning one number per reply.

        def reward(prompts: list[str], completions: list[str], answer: list[str], **kwargs) -> list[float]

    `prompts`: the questions; `completions`: the reply texts; `answer`: the expected answers (a GSM8K
    answer's value after "####"). `kwargs` also holds `task`, `truncated` (list[bool]) and, for `--data`
    problems, every other field of their JSONL records, as lists. A function without `**kwargs` gets only
    the arguments it names. Any sequence of numbers will do as the result; a value that is not a finite
    number scores its reply 0, an exception or a wrong count the whole group, and each is logged.
    """

    def __call__(self, prompts: list[str], completions: list[str], answer: list[str], **kwargs: Any
                 ) -> list[float]: ...


def load_reward(spec: str) -> tuple[str, BatchReward]:
    """`package.module:function` -> (its name, the function). The current directory is importable, as it is
    for `python -m` (a reward module beside the data needs no install)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--reward {spec!r}: expected package.module:function")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is the user's error, reported as such
        raise ValueError(f"--reward {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"--reward {spec!r}: {module_name} has no function {attribute!r}")
    try:
        inspect.signature(function).bind_partial(completions=[])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--reward {spec!r}: {attribute} must take completions=... as a keyword argument "
                         "(the signature: f(prompts, completions, answer, **kwargs))") from exc
    return attribute, function


def _arguments_for(function: BatchReward, arguments: dict[str, list]) -> dict[str, list]:
    """All the columns for a function with **kwargs (TRL's convention); only those it names otherwise."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return arguments
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return arguments
    return {key: value for key, value in arguments.items() if key in parameters}


def _as_number(value: Any) -> float | None:
    """A finite float, or None for anything else (bools, strings, NaN, infinities, too-large integers)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return None
    return number if math.isfinite(number) else None


def call_batch_reward(name: str, function: BatchReward, completions: list[Completion]
                      ) -> tuple[list[float], list[bool]]:
    """The user function's scores for `completions`, and which of them were errors (scored 0)."""
    problems = [c.problem for c in completions]
    columns = sorted({key for p in problems for key in p.fields} - set(_STANDARD_COLUMNS))
    arguments = {key: [p.fields.get(key) for p in problems] for key in columns}
    arguments.update(prompts=[p.question for p in problems], completions=[c.text for c in completions],
                     answer=[p.answer for p in problems], task=[p.task for p in problems],
                     truncated=[c.truncated for c in completions])
    try:
        values = function(**_arguments_for(function, arguments))
        values = list(values)  # any sequence: a list, a tuple, a NumPy array, a tensor
    except Exception:  # user code: logged, scored 0, training goes on
        log.exception("reward %r raised on %d replies; scoring them 0", name, len(completions))
        return [0.0] * len(completions), [True] * len(completions)
    if len(values) != len(completions):
        log.error("reward %r returned %d values for %d replies; scoring them 0", name, len(values),
                  len(completions))
        return [0.0] * len(completions), [True] * len(completions)
    numbers = [_as_number(v.item() if hasattr(v, "item") else v) for v in values]
    if None in numbers:
        log.error("reward %r returned %d values that are not finite numbers; scoring them 0", name,
                  numbers.count(None))
    return [0.0 if n is None else n for n in numbers], [n is None for n in numbers]


@dataclass
class RewardSet:
    """A weighted sum of named rewards: built-in ones (per reply) and user functions (per group)."""

    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    functions: dict[str, Callable[[Completion], float]] = field(default_factory=lambda: dict(REWARDS))
    batch_functions: dict[str, BatchReward] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = {**self.functions, **self.batch_functions}
        unknown = set(self.weights) - set(known)
        if unknown:
            raise ValueError(f"unknown reward(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")
        for name in self.batch_functions:
            self.weights.setdefault(name, 1.0)

    def __call__(self, completion: Completion) -> tuple[float, dict[str, float]]:
        total, parts, _ = self.score([completion])[0]
        return total, parts

    def score(self, completions: list[Completion]) -> list[tuple[float, dict[str, float], int]]:
        """(total, each component, how many components failed and scored 0) per completion."""
        parts: list[dict[str, float]] = [{} for _ in completions]
        errors = [0] * len(completions)
        for name in self.weights:
            if name in self.batch_functions:
                values, failed = call_batch_reward(name, self.batch_functions[name], completions)
            else:
                values, failed = [], []
                for c in completions:
                    try:
                        values.append(float(self.functions[name](c)))
                        failed.append(False)
                    except Exception:  # a broken reward scores 0 and is logged, training goes on
                        log.exception("reward %r failed on a completion of %r; scoring it 0", name, c.problem.task)
                        values.append(0.0)
                        failed.append(True)
            for i, (row, value) in enumerate(zip(parts, values, strict=True)):
                row[name] = value
                errors[i] += failed[i]
        return [(sum(self.weights[n] * v for n, v in row.items()), row, e) for row, e in zip(parts, errors,
                                                                                              strict=True)]
