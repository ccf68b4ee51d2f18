"""Reading a reply's final answer and checking it: exact, numeric, LaTeX (math-verify), and Countdown
expressions evaluated on a parsed syntax tree (never `eval`)."""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction

from ..tokenizer import THINK_CLOSE, THINK_OPEN

MAX_ANSWER_CHARS = 200  # a longer "answer" is a list of guesses, not an answer
_LEADS = re.compile(r"^(so\s+)?(the\s+)?(final\s+)?answer(\s+is)?\s*[:=]?\s*", re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{(.*)\}")


def split_reply(reply: str, opened: bool = True) -> tuple[str, str] | None:
    """(reasoning, answer part) of an R1-format reply, or None when the format is broken.

    `opened`: the prompt already opened the think block (the template ends with `<think>`). Exactly one
    closing tag is required and no further think tags: a second block or tags left open are format errors.
    """
    body = reply if opened else reply.lstrip()
    if not opened:
        if not body.startswith(THINK_OPEN):
            return None
        body = body[len(THINK_OPEN):]
    if body.count(THINK_CLOSE) != 1 or THINK_OPEN in body:
        return None
    reasoning, answer = body.split(THINK_CLOSE)
    return reasoning, answer


def extract_answer(reply: str, opened: bool = True) -> str | None:
    """The final answer after the think block: `<answer>` tags, a `\\boxed{}`, or the text with its
    "The answer is" stripped; None when there is no single short answer."""
    parts = split_reply(reply, opened)
    if parts is None:
        return None
    text = parts[1].strip()
    tagged = _ANSWER_TAG.findall(text)
    if len(tagged) > 1:
        return None
    if tagged:
        text = tagged[0].strip()
    boxed = _BOXED.findall(text)
    if boxed:
        text = boxed[-1].strip()
    text = _LEADS.sub("", text).strip().rstrip(".").strip()
    if not text or len(text) > MAX_ANSWER_CHARS or "\n" in text:
        return None
    return text


def _number(text: str) -> Fraction | None:
    cleaned = text.replace(",", "").replace(" ", "")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(given: str, expected: str) -> bool:
    """Exact text, then equal numbers (1,000 = 1000.0), then math-verify for LaTeX."""
    if given.strip() == expected.strip():
        return True
    a, b = _number(given), _number(expected)
    if a is not None and b is not None:
        return a == b
    if "\\" in given or "\\" in expected or "$" in given or "$" in expected:
        from math_verify import parse, verify

        try:
            return bool(verify(parse(f"${expected}$"), parse(f"${given}$")))
        except Exception:  # math-verify raises on what it cannot parse; that is no match
            return False
    return False


def evaluate_countdown(expression: str, numbers: list[int]) -> Fraction | None:
    """Value of an arithmetic expression over `numbers` (each used at most once), or None if it is not one.

    Only integers from the list, + - * / and parentheses are allowed; the tree is walked, never executed.
    """
    if len(expression) > MAX_ANSWER_CHARS:
        return None
    try:
        tree = ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        return None
    used: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if right == 0:
                raise ValueError("division by zero")
            return left / right
        raise ValueError(f"not allowed: {type(node).__name__}")

    try:
        value = walk(tree)
    except (ValueError, RecursionError):
        return None
    if Counter(used) - Counter(numbers):  # a number not given, or given fewer times
        return None
    return value
