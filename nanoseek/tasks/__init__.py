"""Procedurally generated, verifiable tasks: each problem has a question, an exact answer and a worked
solution, from a seeded generator with a difficulty knob."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    task: str
    question: str
    answer: str
    reasoning: str  # the worked solution, step by step


def arithmetic(rng: random.Random, difficulty: int = 1) -> Problem:
    """A chain of + - * over small integers, worked left to right with * first."""
    terms = [rng.randint(1, 9 * 10 ** (difficulty > 2)) for _ in range(difficulty + 2)]
    ops = [rng.choice("+-*") for _ in terms[1:]]
    expression = " ".join(f"{t} {o}" for t, o in zip(terms, ops, strict=False)) + f" {terms[-1]}"
    steps = []
    values, pending = [terms[0]], []
    for op, term in zip(ops, terms[1:], strict=True):  # products first
        if op == "*":
            product = values[-1] * term
            steps.append(f"{values[-1]} * {term} = {product}")
            values[-1] = product
        else:
            pending.append(op)
            values.append(term)
    total = values[0]
    for op, term in zip(pending, values[1:], strict=True):
        result = total + term if op == "+" else total - term
        steps.append(f"{total} {op} {term} = {result}")
        total = result
    return Problem("arithmetic", f"What is {expression}?", str(total), "\n".join(steps) or f"{total}")


def linear_equation(rng: random.Random, difficulty: int = 1) -> Problem:
    """Solve a x + b = c for an integer x."""
    scale = 10 ** difficulty
    x, a = rng.randint(-scale, scale), rng.choice([n for n in range(-9, 10) if n not in (0,)])
    b = rng.randint(-scale, scale)
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    steps = [f"Subtract {b} from both sides: {a}x = {c} - ({b}) = {c - b}",
             f"Divide both sides by {a}: x = {c - b} / {a} = {x}"]
    return Problem("linear_equation", f"Solve for x: {a}x {sign} {abs(b)} = {c}", str(x), "\n".join(steps))


def sorting(rng: random.Random, difficulty: int = 1) -> Problem:
    """Sort a list of integers ascending, by repeatedly taking the smallest."""
    items = [rng.randint(0, 10 * 10 ** difficulty) for _ in range(difficulty + 3)]
    rest, done, steps = list(items), [], []
    while rest:
        smallest = min(rest)
        rest.remove(smallest)
        done.append(smallest)
        steps.append(f"smallest of the rest is {smallest}: {', '.join(map(str, done))}")
    answer = ", ".join(map(str, done))
    return Problem("sorting", f"Sort ascending: {', '.join(map(str, items))}", answer, "\n".join(steps))


TASKS: dict[str, Callable[[random.Random, int], Problem]] = {
    "arithmetic": arithmetic, "linear_equation": linear_equation, "sorting": sorting,
}
