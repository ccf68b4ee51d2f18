"""Checking a final answer: exact, numeric, LaTeX (math-verify), and Countdown expressions evaluated on a
parsed syntax tree (never `eval`). Reading the answer out of a reply is the R1 format's job (`nanoseek.r1`)."""

from __future__ import annotations

import ast
from collections import Counter
from fractions import Fraction

MAX_EXPRESSION_CHARS = 200  # a longer expression is a list of guesses, not an answer


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
    if len(expression) > MAX_EXPRESSION_CHARS:
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
