"""Procedurally generated, verifiable tasks: each problem has a question, an exact answer and a worked
solution, from a seeded generator with a difficulty knob. Training and evaluation draw from disjoint seed
ranges, so evaluation problems are never trained on."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .check import answers_match, evaluate_countdown, extract_answer


@dataclass(frozen=True)
class Problem:
    task: str
    question: str
    answer: str
    reasoning: str  # the worked solution, step by step
    numbers: tuple[int, ...] = field(default=())  # Countdown's numbers: its answers are expressions over them

    def check(self, answer: str | None) -> bool:
        """Is `answer` (an extracted final answer) right?"""
        if answer is None:
            return False
        if self.task == "countdown":  # any expression that reaches the target counts
            value = evaluate_countdown(answer.split("=")[0], list(self.numbers))
            return value is not None and value == evaluate_countdown(self.answer, list(self.numbers))
        if self.task == "sorting":
            return [p.strip() for p in answer.split(",")] == [p.strip() for p in self.answer.split(",")]
        return answers_match(answer, self.answer)

    def check_reply(self, reply: str, opened: bool = True) -> bool:
        return self.check(extract_answer(reply, opened))


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


TASKS: dict[str, Callable[[random.Random, int], Problem]] = {
    "arithmetic": arithmetic, "linear_equation": linear_equation, "sorting": sorting, "countdown": countdown,
}
EVAL_SEED_OFFSET = 1 << 40  # evaluation problems come from seeds no training run reaches
# Held-out problems per task and difficulty. Small problem spaces repeat questions across seeds (arithmetic
# at difficulty 1 has 6,561), so training draws skip any question among these; evaluation uses no more.
HELD_OUT_PROBLEMS = 2000


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
    seed = index + (EVAL_SEED_OFFSET if split == "eval" else 0)
    return TASKS[task](random.Random(f"{task}:{seed}:{difficulty}"), difficulty)


@functools.lru_cache(maxsize=64)
def evaluation_questions(task: str, difficulty: int) -> frozenset[str]:
    """The questions of a task's held-out problems at a difficulty."""
    return frozenset(make_problem(task, i, difficulty, "eval").question for i in range(HELD_OUT_PROBLEMS))


def training_problem(task: str, index: int, difficulty: int = 1) -> Problem:
    """Training problem `index`: a held-out question is replaced by a draw from a seed range of its own."""
    for attempt in range(1000):
        problem = make_problem(task, index + attempt * (1 << 32), difficulty)
        if problem.question not in evaluation_questions(task, difficulty):
            return problem
    raise ValueError(f"task {task!r} at difficulty {difficulty}: no training problem outside the held-out set")


def load_problems(path: str | Path) -> list[Problem]:
    """User problems from JSONL in GSM8K/MATH style: {"question": ..., "answer": ...} (a GSM8K answer's final
    value after "####" is used)."""
    from ..data.sources import DataError, iter_jsonl  # the data package imports the tasks for its corpus

    problems = []
    for number, record in iter_jsonl(Path(path)):
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected an object with question and answer")
        for key in ("question", "answer"):
            if not isinstance(record.get(key), (str, int, float)) or isinstance(record.get(key), bool):
                raise DataError(f"{path}:{number}: missing or non-text field {key!r}")
        answer = str(record["answer"])
        final = answer.split("####")[-1].strip()
        problems.append(Problem("user", str(record["question"]), final, answer if "####" in answer else ""))
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems
