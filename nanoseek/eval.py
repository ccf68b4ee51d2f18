"""Evaluation the way DeepSeek-R1 reports it (paper §3, Supplementary §4): pass@1 averaged over k samples at
temperature 0.6 and top-p 0.95, cons@k (majority vote over the k final answers), the unbiased pass@k
estimator of Chen et al. 2021 (their eq. 1), and greedy decoding as a debugging aid; per task and difficulty.

Beside the scores, what R1-Zero's figures track: the share of replies that reason (a think block with the
task's step lines, not a bare tag), mean reply length overall and by mode, accuracy by mode, the truncation
rate, and the entropy of the reply's first token, which in the zero layout is the choice of mode.
`--force think|direct` prefills the mode, to measure each one's accuracy apart (the calibration of a base);
the first token is then the first one after the prefill.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from .engine import LLM, SamplingParams
from .flags import add_weight_flags
from .r1 import ANSWER_OPEN, LAYOUTS, THINK_OPEN, Layout, layout
from .tasks import (
    HELD_OUT_PROBLEMS,
    Problem,
    evaluation_questions,
    load_problems,
    make_problem,
    parse_tasks,
    question_space,
)

FORCED = {"think": THINK_OPEN + "\n", "direct": ANSWER_OPEN}  # the zero layout's two openings


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that k of n samples, c of them correct, include a correct one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@dataclass
class Scored:
    """One sampled reply as the report counts it."""

    correct: bool
    answer: str | None
    reasons: bool
    tokens: int
    truncated: bool


def score_reply(problem: Problem, text: str, tokens: int, truncated: bool, form: Layout, opened: bool) -> Scored:
    reply = form.parse(text, opened)
    answer = None if truncated else reply.answer
    return Scored(problem.check(answer), answer, problem.reasons(reply.reasoning), tokens, truncated)


def prompts_for(llm: LLM, problems: list[Problem], form: Layout, force: str | None = None
                ) -> tuple[list[list[int] | str], bool, str]:
    """The prompts of `problems` in a layout (with a forced opening), whether they open a think block, and the
    text prefilled for the model (the parser reads it back in front of each reply)."""
    prefill = FORCED[force] if force else ""
    if llm.tokenizer is None:
        texts = [form.prompt_text(None, p.question) for p in problems]
        return [text + prefill for text, _ in texts], bool(texts) and texts[0][1], prefill
    prompts = [form.prompt(llm.tokenizer, p.question) for p in problems]
    extra = llm.tokenizer.encode(prefill, add_special_tokens=False) if prefill else []
    return [p.ids + extra for p in prompts], bool(prompts) and prompts[0].opened, prefill


@torch.no_grad()
def first_token_entropy(llm: LLM, prompts: list[list[int] | str], temperature: float, batch: int = 64) -> float:
    """Mean entropy (nats) of the first reply token's distribution at the sampling temperature."""
    ids = [llm.encode(p) if isinstance(p, str) else p for p in prompts]
    entropies = []
    for start in range(0, len(ids), batch):
        rows = ids[start:start + batch]
        width = max(map(len, rows))
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):  # left-aligned; the last real position's logits are read
            inputs[i, :len(row)] = torch.tensor(row)
        last = torch.tensor([len(r) - 1 for r in rows])[:, None]
        logits = llm.model(inputs.to(llm.model.device), logits_index=last.to(llm.model.device))[:, 0].float()
        logp = (logits / max(temperature, 1e-6)).log_softmax(-1)
        entropies += (-(logp.exp() * logp).sum(-1)).tolist()
    return statistics.mean(entropies) if entropies else 0.0


def summarise(rows: list[list[Scored]], k: int, curve: list[int]) -> dict[str, float]:
    """Scores of a group of problems, each with its k sampled replies."""
    flat = [s for replies in rows for s in replies]
    reasoning = [s for s in flat if s.reasons]
    direct = [s for s in flat if not s.reasons]
    votes = [Counter(s.answer for s in replies if s.answer is not None) for replies in rows]
    majority = [next(s.correct for s in replies if s.answer == v.most_common(1)[0][0]) if v else False
                for replies, v in zip(rows, votes, strict=True)]
    correct = [sum(s.correct for s in replies) for replies in rows]
    mean = lambda values: statistics.mean(values) if values else 0.0  # noqa: E731
    report = {
        "problems": len(rows),
        "pass@1": 100 * mean([c / len(r) for c, r in zip(correct, rows, strict=True)]),
        f"cons@{k}": 100 * mean(majority),
        f"pass@{k}": 100 * mean([pass_at_k(len(r), c, k) for c, r in zip(correct, rows, strict=True)]),
        "reasoning_share": 100 * len(reasoning) / len(flat),
        "mean_length": mean([s.tokens for s in flat]),
        "length_reasoning": mean([s.tokens for s in reasoning]),
        "length_direct": mean([s.tokens for s in direct]),
        "accuracy_reasoning": 100 * mean([s.correct for s in reasoning]),
        "accuracy_direct": 100 * mean([s.correct for s in direct]),
        "truncated": 100 * mean([s.truncated for s in flat]),
    }
    if curve:
        report["pass@k_curve"] = {str(j): 100 * mean([pass_at_k(len(r), c, j) for c, r in
                                                      zip(correct, rows, strict=True)]) for j in curve}
    return report


def evaluate(llm: LLM, problems: list[tuple[Problem, int]], samples: int = 4, temperature: float = 0.6,
             top_p: float = 0.95, max_tokens: int = 256, seed: int = 0, template: str = "chat",
             force: str | None = None, curve: bool = False) -> dict:
    """problems: (problem, difficulty) pairs. Returns overall and per task/difficulty scores, with each
    generated level's number of distinct questions and the share of them held out."""
    greedy = temperature == 0
    form = layout(template)
    if force is not None and (force not in FORCED or form.name != "zero"):
        raise ValueError(f"--force {force!r}: 'think' or 'direct', with --template zero")
    params = [SamplingParams(n=1 if greedy else samples, temperature=temperature, top_p=1.0 if greedy else top_p,
                             max_tokens=max_tokens, seed=seed * 1_000_003 + i)  # independent draws per problem
              for i in range(len(problems))]
    prompts, opened, prefill = prompts_for(llm, [p for p, _ in problems], form, force)
    outputs = llm.generate(prompts, params)
    groups: dict[str, list[list[Scored]]] = defaultdict(list)
    for (problem, difficulty), output in zip(problems, outputs, strict=True):
        replies = [score_reply(problem, prefill + o.text, len(o.token_ids), o.finish_reason == "length", form,
                               opened) for o in output.outputs]
        keys = ["all", problem.task] + ([f"{problem.task}/difficulty-{difficulty}"] if difficulty else [])
        for key in keys:
            groups[key].append(replies)
    k = params[0].n if params else samples
    curve_ks = [j for j in (1, 2, 4, 8, 16, 32, 64) if j <= k] if curve else []
    report = {"samples": k, "temperature": temperature, "top_p": 1.0 if greedy else top_p,
              "max_tokens": max_tokens, "template": form.name, "force": force,
              "first_token_entropy": first_token_entropy(llm, prompts, temperature or 1.0)}
    for key, rows in groups.items():
        report[key] = summarise(rows, k, curve_ks)
        task, _, level = key.partition("/difficulty-")
        if level:
            space, held_out = question_space(task, int(level)), evaluation_questions(task, int(level))
            report[key].update(distinct_questions=space, held_out_share=len(held_out) / space)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--tasks", default="arithmetic,linear_equation,sorting,countdown")
    parser.add_argument("--data", help="JSONL problems ({question, answer}) instead of generated tasks")
    parser.add_argument("--problems", type=int, default=50, help="held-out problems per task and difficulty")
    parser.add_argument("--difficulties", default="1,2,3")
    parser.add_argument("--samples", type=int, default=4, help="k samples per problem")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (a debugging aid)")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--template", default="chat", choices=tuple(LAYOUTS), help="prompt layout: chat (the "
                        "model's chat template) or zero (User: ... Assistant:, nothing prefilled)")
    parser.add_argument("--force", choices=sorted(FORCED), help="zero layout: prefill the reply's mode")
    parser.add_argument("--curve", action="store_true", help="also report pass@k for k = 1, 2, 4, ... samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    add_weight_flags(parser)
    parser.add_argument("--json", help="also write the report to this file")


def parse_difficulties(text: str) -> list[int]:
    try:
        return [int(d) for d in text.split(",")]
    except ValueError as exc:
        raise ValueError(f"--difficulties {text!r}: comma-separated integers") from exc


def run(args: argparse.Namespace) -> int:
    layout(args.template)  # a bad name fails before the model loads
    if args.data:
        problems = [(p, 0) for p in load_problems(args.data)]
    else:
        tasks, difficulties = parse_tasks(args.tasks), parse_difficulties(args.difficulties)
        if not 1 <= args.problems <= HELD_OUT_PROBLEMS:
            raise ValueError(f"--problems = {args.problems}: must be in [1, {HELD_OUT_PROBLEMS}], the held-out "
                             "problems that training never draws")
        problems = [(make_problem(t, i, d, "eval"), d) for t in tasks for d in difficulties
                    for i in range(args.problems)]
    if args.samples < 1:
        raise ValueError(f"--samples = {args.samples}: must be >= 1")
    llm = LLM(args.model, device=args.device, dtype=args.dtype,
              max_num_seqs=max(args.samples, min(256, len(problems) * args.samples)),
              max_model_len=args.max_tokens + 512, quantize=args.quantize, compile=args.compile,
              index_cache_dtype=args.index_cache_dtype)
    report = evaluate(llm, problems, args.samples, args.temperature, args.top_p, args.max_tokens, args.seed,
                      args.template, args.force, args.curve)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
