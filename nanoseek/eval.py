"""Evaluation the way DeepSeek-R1 reports it (spec grpo-r1.md §2.6): pass@1 averaged over k samples at
temperature 0.6 and top-p 0.95, cons@k (majority vote over the k final answers), the unbiased pass@k
estimator of Chen et al. 2021, and greedy decoding as a debugging aid; per task and difficulty."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

from .engine import LLM, SamplingParams
from .tasks import HELD_OUT_PROBLEMS, Problem, load_problems, make_problem, parse_tasks
from .tasks.check import extract_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that k of n samples, c of them correct, include a correct one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def prompt_for(llm: LLM, problem: Problem) -> list[int] | str:
    """The chat-templated prompt (it opens the think block) when the tokenizer has a template."""
    if llm.tokenizer is not None and llm.tokenizer.chat_template:
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": problem.question}])
        return llm.tokenizer.encode(text, add_special_tokens=False)
    return f"{problem.question}\n<think>\n"


def evaluate(llm: LLM, problems: list[tuple[Problem, int]], samples: int = 4, temperature: float = 0.6,
             top_p: float = 0.95, max_tokens: int = 256, seed: int = 0) -> dict:
    """problems: (problem, difficulty) pairs. Returns overall and per task/difficulty pass@1, cons@k, pass@k."""
    greedy = temperature == 0
    params = [SamplingParams(n=1 if greedy else samples, temperature=temperature, top_p=1.0 if greedy else top_p,
                             max_tokens=max_tokens, seed=seed * 1_000_003 + i)  # independent draws per problem
              for i in range(len(problems))]
    outputs = llm.generate([prompt_for(llm, p) for p, _ in problems], params)
    groups: dict[str, list[tuple[int, int, bool]]] = defaultdict(list)
    for (problem, difficulty), output in zip(problems, outputs, strict=True):
        answers = [None if o.finish_reason == "length" else extract_answer(o.text) for o in output.outputs]
        correct = sum(problem.check(a) for a in answers)
        votes = Counter(a for a in answers if a is not None)
        majority = problem.check(votes.most_common(1)[0][0]) if votes else False
        for key in ("all", problem.task, f"{problem.task}/difficulty-{difficulty}"):
            groups[key].append((len(answers), correct, majority))
    k = params[0].n if params else samples
    report = {"samples": k, "temperature": temperature, "top_p": 1.0 if greedy else top_p, "max_tokens": max_tokens}
    for key, rows in groups.items():
        report[key] = {
            "problems": len(rows),
            "pass@1": 100 * sum(c / n for n, c, _ in rows) / len(rows),
            f"cons@{k}": 100 * sum(m for _, _, m in rows) / len(rows),
            f"pass@{k}": 100 * sum(pass_at_k(n, c, k) for n, c, _ in rows) / len(rows),
        }
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", help="also write the report to this file")


def run(args: argparse.Namespace) -> int:
    if args.data:
        problems = [(p, 0) for p in load_problems(args.data)]
    else:
        tasks = parse_tasks(args.tasks)
        try:
            difficulties = [int(d) for d in args.difficulties.split(",")]
        except ValueError as exc:
            raise ValueError(f"--difficulties {args.difficulties!r}: comma-separated integers") from exc
        if not 1 <= args.problems <= HELD_OUT_PROBLEMS:
            raise ValueError(f"--problems = {args.problems}: must be in [1, {HELD_OUT_PROBLEMS}], the held-out "
                             "problems that training never draws")
        problems = [(make_problem(t, i, d, "eval"), d) for t in tasks for d in difficulties
                    for i in range(args.problems)]
    if args.samples < 1:
        raise ValueError(f"--samples = {args.samples}: must be >= 1")
    llm = LLM(args.model, device=args.device, max_num_seqs=max(args.samples, min(256, len(problems) * args.samples)),
              max_model_len=args.max_tokens + 512)
    report = evaluate(llm, problems, args.samples, args.temperature, args.top_p, args.max_tokens, args.seed)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
