"""Evaluation is held out: no training source draws a held-out question of any built-in task, at any
difficulty, and the report says how large each level's question space is."""

from __future__ import annotations

import pytest

from nanoseek.r1 import ZERO_PROMPT
from nanoseek.tasks import (
    HELD_OUT_PROBLEMS,
    MAX_DIFFICULTY,
    TASKS,
    held_out_questions,
    make_problem,
    question_space,
)
from nanoseek.tasks.corpus import CorpusMix, generate_corpus
from nanoseek.train.grpo import PromptSource
from nanoseek.train.rejection import training_prompts
from nanoseek.train.sft import cold_start

ZERO_HEAD = ZERO_PROMPT.split("{question}")[0]


def corpus_questions(task: str, documents: int) -> list[str]:
    """The question of every pretraining document (both layouts)."""
    questions = []
    for document in generate_corpus(documents, seed=0, max_difficulty=MAX_DIFFICULTY, tasks=[task],
                                    mix=CorpusMix(template_share=0.5, think_share=0.5)):
        assert document.startswith(ZERO_HEAD)  # both kinds, the assistant's and the teacher's
        questions.append(document[len(ZERO_HEAD):].split("\n")[0])
    return questions


def training_questions(task: str) -> dict[str, list[str]]:
    """What each training stage draws, the way it draws it."""
    curriculum = PromptSource([task], seed=0, max_difficulty=MAX_DIFFICULTY)
    drawn = []
    for level in range(1, MAX_DIFFICULTY + 1):  # the curriculum at every level it can reach
        curriculum.difficulty[task] = level
        drawn += [p.question for p in curriculum.next(100)]
    band = PromptSource([task], seed=1, levels=list(range(1, MAX_DIFFICULTY + 1)))
    return {
        "pretraining corpus": corpus_questions(task, 1600),
        "cold-start SFT": [c[0]["content"] for c in cold_start([task], 800, MAX_DIFFICULTY, seed=0)],
        "GRPO prompts": drawn + [p.question for p in band.next(800)],
        "rejection sampling (and the distillation data made from it)":
            [p.question for p in training_prompts([task], list(range(1, MAX_DIFFICULTY + 1)), 100, seed=0)],
    }


@pytest.mark.parametrize("task", list(TASKS))
def test_no_training_source_holds_a_held_out_question(task):
    held_out = held_out_questions(task)
    assert len(held_out) > 0.9 * HELD_OUT_PROBLEMS  # at least most of level 1's draws, whatever repeats
    for source, questions in training_questions(task).items():
        assert len(questions) >= 800, source
        overlap = sum(q in held_out for q in questions)
        assert overlap == 0, f"{task}: {overlap} of {len(questions)} {source} questions are held out"


def test_the_overlap_count_can_fail():
    """The raw generators do repeat held-out questions where a level's space is small: the skipping is
    what keeps the sources clean."""
    for task in ("arithmetic", "linear_equation"):
        raw = [make_problem(task, i, 1).question for i in range(2000)]
        assert sum(q in held_out_questions(task) for q in raw) > 200, task


def test_question_spaces():
    assert question_space("arithmetic", 1) == 9 ** 3 * 3 ** 2 == 6561  # the level the old headline used
    assert question_space("trace", 1) == 1000 * 4 ** 6 > 10 ** 6
    for task in TASKS:
        for level in range(1, 4):
            distinct = {make_problem(task, i, level).question for i in range(3000)}
            assert len(distinct) <= question_space(task, level), (task, level)
    with pytest.raises(ValueError, match="difficulty = 9"):
        make_problem("trace", 0, 9)


def test_a_users_conversations_lose_their_held_out_questions(tmp_path, capsys):
    """SFT and distillation `--data` and rejection sampling's `--mix`: files nobody here wrote, filtered the
    same way, with the count said."""
    import json

    from nanoseek.train.sft import ConversationData, conversations

    held_out = make_problem("trace", 7, 1, "eval").question
    rows = [[{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]
            for q in (held_out, "a question of my own", f" {held_out} ")]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    kept = conversations(ConversationData(data=str(path), tasks="trace", max_difficulty=1), seed=0)
    assert [c[0]["content"] for c in kept] == ["a question of my own"]
    assert "dropped 2 conversations" in capsys.readouterr().out
    for bad in (0, MAX_DIFFICULTY + 1):
        with pytest.raises(ValueError, match=f"--max-difficulty = {bad}"):
            conversations(ConversationData(tasks="trace", examples=4, max_difficulty=bad), seed=0)
