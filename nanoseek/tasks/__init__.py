"""Procedurally generated, verifiable tasks: each problem has a question, an exact answer and a worked
solution, from a seeded generator with a difficulty knob. Evaluation problems come from a seed range of their
own, and every training draw skips every held-out question of its task (at any difficulty), so evaluation
problems are never trained on; `question_space` says how many distinct questions a level has."""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.sources import DataError, iter_jsonl
from .check import answers_match, evaluate_countdown

_TRACE_ANSWER = re.compile(r"^a\s*=\s*(\d)\s*,\s*b\s*=\s*(\d)\s*,\s*c\s*=\s*(\d)$")


@dataclass(frozen=True)
class Problem:
    task: str
    question: str
    answer: str
    reasoning: str  # the worked solution, one step per line
    numbers: tuple[int, ...] = field(default=())  # Countdown's numbers: its answers are expressions over them
    fields: dict[str, Any] = field(default_factory=dict, compare=False)  # a user problem's other JSONL fields

    def check(self, answer: str | None) -> bool:
        """Is `answer` (an extracted final answer) right?"""
        if answer is None:
            return False
        if self.task == "countdown":  # any expression that reaches the target counts
            value = evaluate_countdown(answer.split("=")[0], list(self.numbers))
            return value is not None and value == evaluate_countdown(self.answer, list(self.numbers))
        if self.task == "sorting":
            return [p.strip() for p in answer.split(",")] == [p.strip() for p in self.answer.split(",")]
        if self.task == "trace":
            given = _TRACE_ANSWER.match(answer.strip())
            return given is not None and given.groups() == _TRACE_ANSWER.match(self.answer).groups()
        return answers_match(answer, self.answer)

    def reasons(self, reasoning: str | None) -> bool:
        """Does this think block hold real reasoning: at least all but one of the worked solution's steps as
        well-formed step lines of the task (right or wrong)? A bare or padded tag does not count."""
        if reasoning is None:
            return False
        pattern = STEP_LINES.get(self.task)
        lines = [line.strip() for line in reasoning.splitlines() if line.strip()]
        valid = sum(bool(pattern.fullmatch(line)) if pattern else 1 for line in lines)
        return valid >= max(1, len(self.reasoning.splitlines()) - 1)


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


def countdown(rng: random.Random, difficulty: int = 1) -> Problem:
    """Reach a target from given numbers with + - * / (each number at most once); the answer is any such
    expression, checked by evaluating it (TinyZero's task)."""
    numbers = [rng.randint(1, 9 + 3 * difficulty) for _ in range(difficulty + 2)]
    value, expression, steps = numbers[0], str(numbers[0]), []
    for number in numbers[1:]:
        options = ["+", "*"] + (["-"] if value > number else []) + (["/"] if value % number == 0 else [])
        op = rng.choice(options)
        result = {"+": value + number, "-": value - number, "*": value * number}.get(op, value // number)
        steps.append(f"{value} {op} {number} = {result}")
        expression = f"({expression}) {op} {number}" if len(steps) > 1 else f"{expression} {op} {number}"
        value = result
    shown = numbers[:]
    rng.shuffle(shown)
    question = (f"Using the numbers {', '.join(map(str, shown))}, each at most once, and + - * /, "
                f"write an expression that equals {value}.")
    return Problem("countdown", question, expression, "\n".join(steps), tuple(numbers))


_REGISTERS = "abc"
_TRACE_OPS = ["a<>b", "b<>c", "a+=1", "a-=1"]  # bijections of the 1,000 states that reach them all


def trace(rng: random.Random, difficulty: int = 1) -> Problem:
    """Run a program of difficulty + 5 operations on three registers of digits: swaps of neighbours (`a<>b`,
    `b<>c`) and steps of `a` up or down mod 10. Each operation is a bijection of the 1,000 states, so the
    final state is uniform: a guess is right 0.1% of the time, and a direct answer has to compose every
    operation in one pass.

    The worked solution writes the state before and after each operation, one `a b c` line each. Every
    operation in the question and every state line is four tokens, so each fact a step needs (the previous
    state, the operation) sits at a fixed distance from the token being written: retrieval at a fixed offset
    is what a small model learns within a few hundred steps, while retrieval by content (an induction head)
    takes far longer. A step then copies a digit from the same register or a neighbour, or adds one."""
    values = {r: rng.randrange(10) for r in _REGISTERS}
    start = ", ".join(f"{r}={values[r]}" for r in _REGISTERS)
    states = [" ".join(str(values[r]) for r in _REGISTERS)]
    program = [rng.choice(_TRACE_OPS) for _ in range(difficulty + 5)]
    for op in program:
        if op[1:3] == "<>":
            values[op[0]], values[op[3]] = values[op[3]], values[op[0]]
        else:
            values[op[0]] = (values[op[0]] + (1 if op[1] == "+" else -1)) % 10
        states.append(" ".join(str(values[r]) for r in _REGISTERS))
    answer = ", ".join(f"{r}={values[r]}" for r in _REGISTERS)
    return Problem("trace", f"{start}. {'; '.join(program)}.", answer, "\n".join(states))


TASKS: dict[str, Callable[[random.Random, int], Problem]] = {
    "arithmetic": arithmetic, "linear_equation": linear_equation, "sorting": sorting, "countdown": countdown,
    "trace": trace,
}
# Well-formed lines of each task's worked solutions (what `Problem.reasons` counts).
STEP_LINES = {
    "arithmetic": re.compile(r"-?\d+ [+*-] -?\d+ = -?\d+"),
    "linear_equation": re.compile(r"(Subtract|Divide) .* = -?\d+"),
    "sorting": re.compile(r"smallest of the rest is \d+: \d+(, \d+)*"),
    "countdown": re.compile(r"\d+ [+*/-] \d+ = \d+"),
    "trace": re.compile(r"\d \d \d"),
}
MAX_DIFFICULTY = 8
EVAL_SEED_OFFSET = 1 << 40  # evaluation problems come from seeds no training run reaches
# Held-out problems per task and difficulty. Small problem spaces repeat questions across seeds (arithmetic
# at difficulty 1 has 6,561), so training draws skip any of these questions; evaluation uses no others.
HELD_OUT_PROBLEMS = 2000


def question_space(task: str, difficulty: int) -> int:
    """Distinct questions a task's generator can ask at a difficulty (Countdown: an upper bound, counting
    every ordering of its numbers and every operation sequence)."""
    n = difficulty
    if task == "arithmetic":
        largest = 9 * 10 ** (n > 2)
        return largest ** (n + 2) * 3 ** (n + 1)
    if task == "linear_equation":
        return 18 * (2 * 10 ** n + 1) ** 2
    if task == "sorting":
        return (10 * 10 ** n + 1) ** (n + 3)
    if task == "countdown":
        return (9 + 3 * n) ** (n + 2) * 4 ** (n + 1) * math.factorial(n + 2)
    if task == "trace":
        return 1000 * len(_TRACE_OPS) ** (n + 5)
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def parse_tasks(text: str) -> list[str]:
    """A --tasks value ("arithmetic,countdown") as task names, each checked."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks {text!r}: unknown {', '.join(unknown) or '(none given)'}; tasks: {', '.join(TASKS)}")
    return tasks


def make_problem(task: str, index: int, difficulty: int = 1, split: str = "train") -> Problem:
    """Problem `index` of a task's split: the same problem for the same arguments, disjoint across splits."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if split not in ("train", "eval"):
        raise ValueError(f"split = {split!r}: must be 'train' or 'eval'")
    if not 1 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty = {difficulty}: must be in [1, {MAX_DIFFICULTY}] (the levels with held-out "
                         "problems)")
    seed = index + (EVAL_SEED_OFFSET if split == "eval" else 0)
    return TASKS[task](random.Random(f"{task}:{seed}:{difficulty}"), difficulty)


@functools.lru_cache(maxsize=64)
def evaluation_questions(task: str, difficulty: int) -> frozenset[str]:
    """The questions of a task's held-out problems at a difficulty."""
    return frozenset(make_problem(task, i, difficulty, "eval").question for i in range(HELD_OUT_PROBLEMS))


@functools.lru_cache(maxsize=16)
def held_out_questions(task: str) -> frozenset[str]:
    """Every held-out question of a task, at every difficulty: a question of one level can be asked at
    another (a linear equation's numbers at difficulty 1 are in range at 2), and training skips them all."""
    return frozenset().union(*(evaluation_questions(task, d) for d in range(1, MAX_DIFFICULTY + 1)))


@functools.lru_cache(maxsize=1)
def _every_held_out_question() -> frozenset[str]:
    return frozenset().union(*map(held_out_questions, TASKS))


def without_held_out(conversations: list[list[dict[str, str]]]) -> tuple[list[list[dict[str, str]]], int]:
    """A user's conversations (SFT, distillation or rejection-sampling mix data) less those in which a user
    turn asks a held-out question of any task, and how many were dropped: the evaluation stays held out
    whatever file trains the model."""
    if not conversations:
        return [], 0
    banned = _every_held_out_question()
    kept = [c for c in conversations
            if not any(m.get("role") == "user" and str(m.get("content", "")).strip() in banned for m in c)]
    return kept, len(conversations) - len(kept)


def training_problem(task: str, index: int, difficulty: int = 1) -> Problem:
    """Training problem `index`: a held-out question is replaced by a draw from a seed range of its own."""
    banned = held_out_questions(task)
    for attempt in range(1000):
        problem = make_problem(task, index + attempt * (1 << 32), difficulty)
        if problem.question not in banned:
            return problem
    raise ValueError(f"task {task!r} at difficulty {difficulty}: no training problem outside the held-out set")


def load_problems(path: str | Path) -> list[Problem]:
    """User problems from JSONL in GSM8K/MATH style: {"question": ..., "answer": ...} (a GSM8K answer's final
    value after "####" is used). Every other field of a record is kept in `Problem.fields` (a user reward
    function receives them, as TRL passes a data set's columns)."""
    problems = []
    for number, record in iter_jsonl(Path(path)):
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected an object with question and answer")
        for key in ("question", "answer"):
            if not isinstance(record.get(key), (str, int, float)) or isinstance(record.get(key), bool):
                raise DataError(f"{path}:{number}: missing or non-text field {key!r}")
        answer = str(record["answer"])
        final = answer.split("####")[-1].strip()
        others = {k: v for k, v in record.items() if k not in ("question", "answer")}
        problems.append(Problem("user", str(record["question"]), final, answer if "####" in answer else "",
                                fields=others))
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems
