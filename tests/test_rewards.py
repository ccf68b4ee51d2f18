"""Verifiable tasks and rule-based rewards, including the usual reward hacks."""

from __future__ import annotations

import json
import logging

import pytest

from nanoseek.data import DataError
from nanoseek.r1 import ChatLayout, ZeroLayout
from nanoseek.rewards import (
    REWARDS,
    Completion,
    RewardSet,
    accuracy,
    format_reward,
    language_consistency,
    overlong_penalty,
    random_reward,
)
from nanoseek.tasks import TASKS, Problem, load_problems, make_problem
from nanoseek.tasks.check import answers_match, evaluate_countdown


def reply(reasoning: str, answer: str) -> str:
    """A reply after a prompt that opened the think block."""
    return f"\n{reasoning}\n</think>\nThe answer is {answer}."


def extract_answer(text: str, opened: bool = True) -> str | None:
    return ChatLayout().parse(text, opened).answer


def perturbed(problem: Problem) -> list[str]:
    if problem.task == "sorting":
        items = problem.answer.split(", ")
        return [", ".join(reversed(items)), ", ".join(items[:-1])]
    if problem.task == "countdown":
        first = problem.numbers[0]
        return [f"{problem.answer} + 1", problem.answer.replace(str(first), str(first + 100), 1)]
    if problem.task == "trace":
        a, b, c = (int(part[2:]) for part in problem.answer.split(", "))
        return [f"a={(a + 1) % 10}, b={b}, c={c}", f"a={a}, b={b}, c={(c + 3) % 10}", f"b={b}, a={a}, c={c}",
                f"a={a}, b={b}"]
    return [str(int(problem.answer) + 1), str(int(problem.answer) - 1)]


@pytest.mark.parametrize("task", list(TASKS))
def test_verifiers_accept_worked_solutions_and_reject_perturbed_ones(task):
    for index in range(60):
        problem = make_problem(task, index, difficulty=1 + index % 3)
        assert problem.check(extract_answer(reply(problem.reasoning, problem.answer))), problem
        assert problem.reasons(problem.reasoning) and not problem.reasons("") and not problem.reasons(None)
        for wrong in perturbed(problem):
            assert not problem.check(extract_answer(reply(problem.reasoning, wrong))), (problem, wrong)


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


ZERO_CASES = {
    "direct": ("<answer>a=1, b=2</answer>", None, "a=1, b=2"),
    "reasoning": ("<think>\n3,2\n1,2\n</think>\n<answer>a=1, b=2</answer>", "\n3,2\n1,2\n", "a=1, b=2"),
    "spaces around": ("  <answer> a=1, b=2 </answer>\n", None, "a=1, b=2"),
    "text after the answer": ("<answer>a=1, b=2</answer> and more", None, None),
    "two answers": ("<answer>a=1, b=2</answer><answer>a=2, b=2</answer>", None, None),
    "unclosed think": ("<think>\n3,2\n<answer>a=1, b=2</answer>", "\n3,2\n<answer>a=1, b=2</answer>", None),
    "two think blocks": ("<think>x</think><think>y</think><answer>a=1, b=2</answer>", "x", None),
    "answer before think": ("<answer>a=1, b=2</answer><think>x</think>", None, None),
    "no answer tag": ("a=1, b=2", None, None),
    "empty answer": ("<answer> </answer>", None, None),
    "text before": ("so <answer>a=1, b=2</answer>", None, None),
}


@pytest.mark.parametrize("case", list(ZERO_CASES))
def test_zero_layout_parses_both_modes_alike(case):
    text, reasoning, answer = ZERO_CASES[case]
    parsed = ZeroLayout().parse(text)
    assert (parsed.reasoning, parsed.answer) == (reasoning, answer)


def test_rewards_are_blind_to_the_mode_of_a_reply():
    """R1-Zero may not pay for reasoning as such: a direct and a reasoned reply with the same answer score the
    same under every reward but the length penalty, right or wrong, in the zero layout."""
    zero = ZeroLayout()
    for index in range(50):
        problem = make_problem("trace", index, 1 + index % 3)
        for answer in (problem.answer, "a=0, b=0, c=0" if problem.answer != "a=0, b=0, c=0" else "a=1, b=1, c=1"):
            direct = zero.reply(answer, None)
            reasoned = zero.reply(answer, problem.reasoning)
            scores = {}
            for text in (direct, reasoned):
                completion = Completion(problem, text, len(text) // 3, 64, opened=False, form=zero)
                assert problem.reasons(completion.reply.reasoning) == (text == reasoned)
                scores[text] = {name: REWARDS[name](completion) for name in ("accuracy", "format", "language")}
                scores[text]["default"] = RewardSet()(completion)[0]
            assert scores[direct] == scores[reasoned], (problem, answer)
            assert scores[direct]["accuracy"] == float(answer == problem.answer)
    # the random control: a fair coin per reply whatever its mode or correctness
    for reasoning in (None, "x"):
        flips = [random_reward(Completion(make_problem("trace", i), zero.reply("a=1, b=1", reasoning), 9, 64,
                                          opened=False, form=zero)) for i in range(400)]
        assert 0.4 < sum(flips) / len(flips) < 0.6


def test_trace_task():
    problem = make_problem("trace", 3, difficulty=2)
    lines = problem.reasoning.splitlines()
    assert len(problem.question.split(";")) == 7 and len(lines) == 8  # 7 operations, 8 states
    assert problem.answer == "a={}, b={}, c={}".format(*lines[-1].split())
    assert problem.check("a = {} , b = {},c={}".format(*lines[-1].split()))
    assert problem.reasons("\n".join(lines[1:])) and not problem.reasons("\n".join(lines[2:]))
    assert not problem.reasons("\n".join(["x"] * 8)) and not problem.reasons("1 2 3")
    # every final state is reachable, about as often: a direct guess is right 0.1% of the time
    finals = [make_problem("trace", i, 1).answer for i in range(20000)]
    assert len(set(finals)) == 1000 and max(finals.count(f) for f in set(finals)) < 60


def test_a_user_reward_is_scored_and_its_garbage_is_zero(caplog):
    from nanoseek.rewards import call_batch_reward

    problems = [Problem("user", f"q{i}", "4", "", fields={"level": i}) for i in range(4)]
    completions = [Completion(p, f"reply {i}", 2, 64) for i, p in enumerate(problems)]
    seen = {}

    def reward(prompts, completions, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, answer=answer, **kwargs)
        return [1.5, None, float("inf"), True]

    with caplog.at_level(logging.ERROR):
        scores, errors = call_batch_reward("mine", reward, completions)
    assert scores == [1.5, 0.0, 0.0, 0.0] and errors == [False, True, True, True]
    assert seen["prompts"] == ["q0", "q1", "q2", "q3"] and seen["completions"][1] == "reply 1"
    assert seen["answer"] == ["4"] * 4 and seen["level"] == [0, 1, 2, 3] and seen["truncated"] == [False] * 4
    assert "reward 'mine' returned 3 values that are not finite numbers" in caplog.text
    rewards = RewardSet({"format": 0.0}, batch_functions={"mine": reward})
    assert rewards.weights == {"format": 0.0, "mine": 1.0}
    assert [total for total, _, _ in rewards.score(completions)] == [1.5, 0.0, 0.0, 0.0]


def test_a_user_reward_may_return_any_sequence_and_name_only_what_it_needs(caplog):
    import numpy as np

    from nanoseek.rewards import call_batch_reward

    problems = [Problem("user", f"q{i}", "4", "", fields={"level": i}) for i in range(3)]
    completions = [Completion(p, "reply", 2, 64) for p in problems]

    def trl_style(prompts, completions, answer):  # no **kwargs: gets only what it names
        return np.array([1.0, 0.5, 10 ** 400 if len(prompts) == 3 else 0.0], dtype=object)

    with caplog.at_level(logging.ERROR):
        scores, errors = call_batch_reward("short", trl_style, completions)
    assert scores == [1.0, 0.5, 0.0] and errors == [False, False, True]  # a too-large int is no number
    assert call_batch_reward("tuple", lambda completions, **_: (1, 2, 3), completions)[0] == [1.0, 2.0, 3.0]
    assert call_batch_reward("count", lambda completions, **_: [1.0], completions)[1] == [True] * 3
    assert "returned 1 values for 3 replies" in caplog.text


def test_language_reward_pays_nothing_for_an_empty_or_broken_reply():
    problem = make_problem("arithmetic", 0, 1)
    assert language_consistency(Completion(problem, "", 0, 64)) == 0.0
    assert language_consistency(Completion(problem, "\n</think>\n", 2, 64)) == 0.0
    assert language_consistency(Completion(problem, f"\nx\n</think>\n{problem.answer}", 5, 64, truncated=True)) == 0
