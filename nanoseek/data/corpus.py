"""The built-in offline corpus: seeded, procedurally generated worked solutions in the R1 layout, so the
default run needs no download and the reasoning stages start from a base model with the right priors."""

from __future__ import annotations

import random
from collections.abc import Iterator

from ..tasks import TASKS, Problem
from ..tokenizer import THINK_CLOSE, THINK_OPEN

_OPENINGS = ["", "Question: ", "Problem: ", "Q: "]
_CLOSINGS = ["The answer is {answer}.", "So the answer is {answer}.", "Answer: {answer}", "{answer}"]


def render(problem: Problem, rng: random.Random) -> str:
    """One document: question, reasoning inside a think block, then the answer (spec grpo-r1.md §2.3)."""
    opening, closing = rng.choice(_OPENINGS), rng.choice(_CLOSINGS)
    return (f"{opening}{problem.question}\n{THINK_OPEN}\n{problem.reasoning}\n{THINK_CLOSE}\n"
            f"{closing.format(answer=problem.answer)}")


def generate_corpus(documents: int, seed: int = 0, max_difficulty: int = 3,
                    tasks: list[str] | None = None) -> Iterator[str]:
    """`documents` documents over `tasks` (default: all), the same ones for the same seed."""
    rng = random.Random(seed)
    names = sorted(tasks or TASKS)
    for _ in range(documents):
        problem = TASKS[rng.choice(names)](rng, rng.randint(1, max_difficulty))
        yield render(problem, rng)
