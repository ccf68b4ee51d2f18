"""The built-in offline corpus: seeded, procedurally generated documents about the verifiable tasks, so the
default run needs no download. Every problem is a training draw: no document holds a held-out question.

Two kinds of document (the R1-Zero design: RL selects a behaviour that pretraining put in the model at low
probability, so the corpus decides what there is to select):

* textbook worked solutions, `User: ...\nTeacher:`, the step lines, then the answer in its tags: where the
  step skill is learned. A one-letter mark stands where a reasoning reply has its think tags, so each step
  line sits at the very offset it has in the assistant's reasoning (one token off, the skill did not carry
  over to the assistant's think block in 200 annealing steps: measured, docs/r1-zero.md). The R1 tags
  appear only in the assistant's replies, so whether the assistant ever reasons is `think_share`'s alone
  (with think tags in the textbook too, RL from a base with no reasoning under the layout still found
  reasoning: measured, docs/r1-zero.md);
* documents in the `zero` layout (`User: ...\\nAssistant:` and the reply), the layout GRPO and evaluation
  prompt with. A share `think_share` of their replies reasons in a think block first; the others answer
  directly. Every answer is right, so a direct reply fails only because the model cannot compute it in one
  pass.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from ..r1 import ZeroLayout
from . import TASKS, Problem, training_problem

_TEXTBOOK = "User: {question}\nTeacher:"
# One byte-level token whatever the tokenizer learns: a lone letter between ':' and a newline is a
# pre-token of its own, so no BPE merge can change its length.
_MARK = "W"


@dataclass(frozen=True)
class CorpusMix:
    """What the corpus is made of: `template_share` of the documents in the zero layout, `think_share` of
    those reasoning; the rest textbook worked solutions."""

    template_share: float = 0.7
    think_share: float = 0.08

    def __post_init__(self) -> None:
        for name in ("template_share", "think_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--corpus-{name.replace('_', '-')} = {getattr(self, name)}: must be in [0, 1]")


def textbook(problem: Problem, zero: ZeroLayout) -> str:
    """A worked solution: the question as the zero layout asks it, `Teacher:` where the prompt says
    `Assistant:`, the step lines between marks where a reasoning reply has `<think>` and `</think>`, then
    the answer as a direct reply gives it."""
    steps = f"{_MARK}\n{problem.reasoning}\n{_MARK}\n"
    return _TEXTBOOK.format(question=problem.question) + steps + zero.reply(problem.answer, None)


def generate_corpus(documents: int, seed: int = 0, max_difficulty: int = 3, tasks: list[str] | None = None,
                    mix: CorpusMix = CorpusMix(), min_difficulty: int = 1) -> Iterator[str]:
    """`documents` documents over `tasks` (default: all) at difficulties min..max, uniformly; the same ones
    for the same arguments."""
    rng = random.Random(seed)
    names = sorted(tasks or TASKS)
    zero = ZeroLayout()
    for index in range(documents):
        task, difficulty = rng.choice(names), rng.randint(min_difficulty, max_difficulty)
        problem = training_problem(task, seed * 1_000_003 + index, difficulty)
        if rng.random() < mix.template_share:
            reasoning = problem.reasoning if rng.random() < mix.think_share else None
            yield zero.document(problem.question, problem.answer, reasoning)
        else:
            yield textbook(problem, zero)
