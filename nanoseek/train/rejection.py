"""`nanoseek rejection-sample`: R1's second SFT data set from its RL checkpoint (DeepSeek-R1 §2.3.3).

k samples per training prompt; a sample is kept only if it is correct, well formatted (a closed think block,
then one answer), reasons (a direct answer of the zero layout is no trace to learn from), not cut by the
length limit, in one language, and not a duplicate of one already kept for that prompt. Prompts that match a
held-out evaluation problem are dropped (decontamination), and so are mixed-in conversations that ask one.
Optional non-reasoning conversations are mixed in. The result is SFT JSONL (`{"messages": [...]}`), written whole or
not at all, with a statistics file beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..data import read_conversations
from ..engine import LLM, SamplingParams
from ..eval import parse_difficulties, prompts_for
from ..flags import add_flags, settings_field, settings_from
from ..r1 import LAYOUTS, THINK_OPEN, Layout, layout
from ..rewards import Completion, format_reward, language_consistency
from ..tasks import Problem, held_out_questions, parse_tasks, training_problem, without_held_out


@dataclass
class RejectionStats:
    prompts: int = 0
    samples: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> samples
    contaminated_prompts: int = 0
    kept_per_task: Counter = field(default_factory=Counter)
    mixed_conversations: int = 0
    mixed_held_out: int = 0  # --mix conversations dropped: they ask a held-out question

    def as_dict(self) -> dict:
        return {"prompts": self.prompts, "samples": self.samples, "kept": self.kept,
                "acceptance": self.kept / self.samples if self.samples else 0.0, "rejected": dict(self.rejected),
                "contaminated_prompts": self.contaminated_prompts, "kept_per_task": dict(self.kept_per_task),
                "mixed_conversations": self.mixed_conversations, "mixed_held_out": self.mixed_held_out}


def verdict(problem: Problem, text: str, truncated: bool, tokens: int, max_tokens: int,
            min_language: float, form: Layout | None = None, opened: bool = True) -> str | None:
    """Why a sample is rejected, or None to keep it."""
    completion = Completion(problem, text, tokens, max_tokens, truncated, opened, form or layout("chat"))
    if truncated:
        return "truncated"
    if not format_reward(completion):
        return "format"
    if completion.reply.reasoning is None:  # the zero layout's direct answers: no trace for the chat SFT
        return "direct"
    if not problem.check(completion.reply.answer):
        return "wrong"
    if language_consistency(completion) < min_language:
        return "language"
    return None


def rejection_sample(llm: LLM, problems: list[Problem], samples: int, params: SamplingParams,
                     banned: set[str] | frozenset[str], keep_per_prompt: int, min_language: float = 1.0,
                     template: str = "chat") -> tuple[list[list[dict]], RejectionStats]:
    """Conversations of verified samples, and the statistics of what was kept and why the rest was not."""
    stats = RejectionStats()
    form = layout(template)
    clean = [p for p in problems if p.question not in banned]
    stats.contaminated_prompts = len(problems) - len(clean)
    params = dataclasses.replace(params, n=samples)
    prompts, opened, _ = prompts_for(llm, clean, form)
    outputs = llm.generate(prompts, params)
    conversations = []
    for problem, output in zip(clean, outputs, strict=True):
        stats.prompts += 1
        seen: set[str] = set()
        for completion in output.outputs:
            stats.samples += 1
            reason = verdict(problem, completion.text, completion.finish_reason == "length",
                             len(completion.token_ids), params.max_tokens, min_language, form, opened)
            key = " ".join(completion.text.split())
            if reason is None and key in seen:
                reason = "duplicate"
            if reason is None and len(seen) >= keep_per_prompt:
                reason = "prompt_quota"
            if reason is not None:
                stats.rejected[reason] += 1
                continue
            seen.add(key)
            stats.kept += 1
            stats.kept_per_task[problem.task] += 1
            # a prompt that opened the think block left it out of the reply; the stored reply carries it, as
            # SFT data does
            reply = f"{THINK_OPEN}\n{completion.text}" if opened else completion.text
            conversations.append([{"role": "user", "content": problem.question},
                                  {"role": "assistant", "content": reply.strip()}])
    return conversations, stats


def training_prompts(tasks: list[str], difficulties: list[int], per_level: int, seed: int) -> list[Problem]:
    """The prompts to sample: training draws of every task and difficulty (held-out questions skipped)."""
    return [training_problem(t, seed * 1_000_003 + i, d) for t in tasks for d in difficulties for i in range(per_level)]


def write_jsonl(conversations: list[list[dict]], path: Path) -> None:
    """All rows or nothing: written to a temporary file in the same directory, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for messages in conversations:
                out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class RejectionConfig:
    """`nanoseek rejection-sample`'s settings: which prompts, how they are sampled, what is kept and mixed in."""

    tasks: str = settings_field("arithmetic", "tasks of the training prompts, comma-separated")
    difficulties: str = settings_field("1,2", "levels of the training prompts, comma-separated")
    template: str = settings_field("chat", "prompt layout", choices=tuple(LAYOUTS))
    prompts: int = settings_field(500, "training prompts per task and difficulty")
    samples: int = settings_field(4, "k samples per prompt")
    keep_per_prompt: int = settings_field(2, "verified samples kept per prompt at most")
    temperature: float = settings_field(0.6, "sampling temperature (R1's recommendation)")
    top_p: float = settings_field(0.95, "nucleus sampling threshold")
    max_tokens: int = settings_field(128, "tokens per sample at most")
    min_language: float = settings_field(1.0, "share of reasoning words in the target language a kept sample needs")
    mix: str | None = settings_field(None, "JSONL conversations of non-reasoning data to mix in", kind=str)
    mix_ratio: float = settings_field(0.25, "mixed conversations per kept sample")
    seed: int = settings_field(0, "seed of the prompts, the samples and the mix")

    def validate(self) -> RejectionConfig:
        parse_tasks(self.tasks)
        parse_difficulties(self.difficulties)
        layout(self.template)
        for name in ("prompts", "samples", "keep_per_prompt", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} = {getattr(self, name)}: must be >= 1")
        if self.mix_ratio < 0:
            raise ValueError(f"--mix-ratio = {self.mix_ratio}: must be >= 0")
        return self


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the checkpoint to sample (R1: the reasoning-RL one)")
    parser.add_argument("--out", default="runs/rejection.jsonl", help="SFT JSONL to write")
    parser.add_argument("--device", default=None)
    add_flags(parser, RejectionConfig)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(RejectionConfig, args)
    tasks, difficulties = parse_tasks(settings.tasks), parse_difficulties(settings.difficulties)
    mixed, mixed_held_out = without_held_out(read_conversations(Path(settings.mix)) if settings.mix else [])
    llm = LLM(args.model, device=args.device, max_num_seqs=64, seed=settings.seed)
    problems = training_prompts(tasks, difficulties, settings.prompts, settings.seed)
    params = SamplingParams(temperature=settings.temperature, top_p=settings.top_p, max_tokens=settings.max_tokens,
                            seed=settings.seed)
    conversations, stats = rejection_sample(llm, problems, settings.samples, params,
                                            frozenset().union(*map(held_out_questions, tasks)),
                                            settings.keep_per_prompt, settings.min_language, settings.template)
    if mixed:
        rng = random.Random(settings.seed)
        chosen = rng.sample(mixed, min(len(mixed), round(settings.mix_ratio * len(conversations))))
        stats.mixed_conversations = len(chosen)
        conversations = conversations + chosen
        rng.shuffle(conversations)
    stats.mixed_held_out = mixed_held_out
    out = Path(args.out)
    write_jsonl(conversations, out)
    stats_path = out.with_suffix(".stats.json")
    stats_path.write_text(json.dumps(stats.as_dict(), indent=2) + "\n")
    print(f"rejection sampling: kept {stats.kept} of {stats.samples} samples from {stats.prompts} prompts "
          f"({100 * stats.as_dict()['acceptance']:.1f}%); rejected {dict(stats.rejected)}; "
          f"{stats.contaminated_prompts} prompts and {stats.mixed_held_out} --mix conversations dropped as "
          f"evaluation problems; wrote {out} and {stats_path}")
    return 0
