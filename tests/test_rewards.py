"""Verifiable tasks and rule-based rewards, including the usual reward hacks."""

from __future__ import annotations

import json
import logging

import pytest

from nanoseek.data import DataError
from nanoseek.rewards import Completion, RewardSet, accuracy, format_reward, language_consistency, overlong_penalty
from nanoseek.tasks import TASKS, Problem, load_problems, make_problem
from nanoseek.tasks.check import answers_match, evaluate_countdown, extract_answer


def reply(reasoning: str, answer: str) -> str:
    """A reply after a prompt that opened the think block."""
    return f"\n{reasoning}\n</think>\nThe answer is {answer}."


def perturbed(problem: Problem) -> list[str]:
    if problem.task == "sorting":
        items = problem.answer.split(", ")
        return [", ".join(reversed(items)), ", ".join(items[:-1])]
    if problem.task == "countdown":
        first = problem.numbers[0]
        return [f"{problem.answer} + 1", problem.answer.replace(str(first), str(first + 100), 1)]
    return [str(int(problem.answer) + 1), str(int(problem.answer) - 1)]


@pytest.mark.parametrize("task", list(TASKS))
def test_verifiers_accept_worked_solutions_and_reject_perturbed_ones(task):
    for index in range(60):
        problem = make_problem(task, index, difficulty=1 + index % 3)
        assert problem.check_reply(reply(problem.reasoning, problem.answer)), problem
        for wrong in perturbed(problem):
            assert not problem.check_reply(reply(problem.reasoning, wrong)), (problem, wrong)


def test_train_and_eval_splits_are_disjoint_and_seeded():
    for task in TASKS:
        train = {make_problem(task, i).question for i in range(200)}
        evaluation = {make_problem(task, i, split="eval").question for i in range(200)}
        assert make_problem(task, 7) == make_problem(task, 7)
        # distinct seed streams; in a small problem space a few questions coincide by chance (rejection
        # sampling decontaminates against the evaluation questions themselves)
        assert len(train & evaluation) <= 20
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        make_problem("chess", 0)


def test_countdown_evaluator_walks_the_tree_and_never_executes():
    numbers = [3, 5, 7]
    assert evaluate_countdown("(3 + 5) * 7", numbers) == 56
    assert evaluate_countdown("7 / (5 - 3)", numbers) == 3.5
    for hostile in ("__import__('os').system('true')", "3 ** 5", "3 + 3", "x + 5", "len([3])", "5 / (3 - 3)",
                    "(3 + 5", "3; 5", "[3, 5][0]", "3 " + "+ 3 " * 100):
        assert evaluate_countdown(hostile, numbers) is None, hostile


ADVERSARIAL = {
    "correct": ("\n2 + 3 = 5\n</think>\nThe answer is 5.", 1.0, 1.0),
    "several answers": ("\nmaybe\n</think>\nThe answer is 5 or 6.", 0.0, 1.0),
    "two answer lines": ("\n</think>\n5\n6", 0.0, 0.0),
    "answer only inside think": ("\nThe answer is 5.\n</think>\n", 0.0, 0.0),
    "no closing tag": ("\n2 + 3 = 5\nThe answer is 5.", 0.0, 0.0),
    "repeated tags": ("\nx\n</think>\n<think>\ny\n</think>\nThe answer is 5.", 0.0, 0.0),
    "two answer tags": ("\nx\n</think>\n<answer>5</answer><answer>6</answer>", 0.0, 0.0),
    "empty": ("", 0.0, 0.0),
    "huge": ("\n" + "5 " * 20000 + "\n</think>\n" + "5 " * 5000, 0.0, 0.0),
}


@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_rewards_against_hacks(case):
    text, expected_accuracy, expected_format = ADVERSARIAL[case]
    problem = Problem("arithmetic", "What is 2 + 3?", "5", "2 + 3 = 5")
    completion = Completion(problem, text, tokens=len(text.split()), max_tokens=64)
    assert accuracy(completion) == expected_accuracy
    assert format_reward(completion) == expected_format


def test_truncated_and_overlong_replies():
    problem = Problem("arithmetic", "What is 2 + 3?", "5", "")
    good = "\n2 + 3 = 5\n</think>\nThe answer is 5."
    assert accuracy(Completion(problem, good, 10, 100, truncated=True)) == 0.0
    assert overlong_penalty(Completion(problem, good, 70, 100)) == 0.0
    assert overlong_penalty(Completion(problem, good, 90, 100)) == pytest.approx(-0.6)
    assert overlong_penalty(Completion(problem, good, 100, 100, truncated=True)) == -1.0


def test_language_consistency_and_answer_forms():
    problem = Problem("arithmetic", "q", "0.5", "")
    assert language_consistency(Completion(problem, "\nhalf of one\n</think>\n0.5", 5, 64)) == 1.0
    assert language_consistency(Completion(problem, "\nhalf 一半 of one\n</think>\n0.5", 5, 64)) == 0.75
    assert answers_match("1/2", "0.5") and answers_match("1,000", "1000.0") and not answers_match("0.51", "0.5")
    assert answers_match("\\frac{1}{2}", "0.5") and answers_match("\\boxed{3}", "3")
    assert extract_answer("\nx\n</think>\nSo the answer is \\boxed{42}.") == "42"
    assert extract_answer("<think>x</think> Answer: 7", opened=False) == "7"
    assert extract_answer("x</think> Answer: 7", opened=False) is None  # the think block never opened


def test_reward_set_weights_and_a_failing_reward(caplog):
    problem = Problem("arithmetic", "What is 2 + 3?", "5", "")
    completion = Completion(problem, "\n2 + 3 = 5\n</think>\n5", 8, 64)
    rewards = RewardSet({"accuracy": 1.0, "format": 0.5})
    assert rewards(completion) == (1.5, {"accuracy": 1.0, "format": 1.0})

    def broken(c: Completion) -> float:
        raise RuntimeError("boom")

    rewards = RewardSet({"accuracy": 1.0, "broken": 2.0}, {"accuracy": accuracy, "broken": broken})
    with caplog.at_level(logging.ERROR):
        assert rewards(completion) == (1.0, {"accuracy": 1.0, "broken": 0.0})
    assert "reward 'broken' failed" in caplog.text
    with pytest.raises(ValueError, match="unknown reward"):
        RewardSet({"style": 1.0})


def test_user_problems_in_gsm8k_style(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "2 + 2?", "answer": "Two and two.\n#### 4"}) + "\n"
                    + json.dumps({"question": "Half of one?", "answer": "\\frac{1}{2}"}) + "\n")
    first, second = load_problems(path)
    assert first.answer == "4" and first.check("4") and second.check("0.5")
    path.write_text(json.dumps({"question": "2 + 2?"}) + "\n")
    with pytest.raises(DataError, match=r"gsm.jsonl:1: missing or non-text field 'answer'"):
        load_problems(path)
    path.write_text("\n")
    with pytest.raises(DataError, match="no problems"):
        load_problems(path)
