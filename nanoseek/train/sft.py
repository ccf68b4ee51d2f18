"""`nanoseek sft`: supervised fine-tuning on conversations, loss on the assistant's tokens only; the same
training loop as pretraining with chat data. Without `--data`, cold-start data in the R1 format is generated
from the verifiable tasks (DeepSeek-R1 §2.3.1: a small cold-start SFT before
reasoning RL)."""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import load_model, load_tokenizer
from ..data import ChatSequences, read_conversations
from ..flags import add_flags, settings_field, settings_from
from ..r1 import ChatLayout
from ..tasks import MAX_DIFFICULTY, parse_tasks, training_problem, without_held_out
from .config import PRETRAIN_ONLY, add_run_arguments, add_train_arguments, train_config_from
from .loop import Trainer, run_distributed


def cold_start(tasks: list[str], examples: int, max_difficulty: int, seed: int) -> list[list[dict[str, str]]]:
    """Conversations of worked solutions from the tasks' training split, replies in the chat layout."""
    chat = ChatLayout()
    conversations = []
    for index in range(examples):
        task = tasks[index % len(tasks)]
        problem = training_problem(task, seed * 1_000_003 + index, 1 + index % max_difficulty)
        conversations.append([{"role": "user", "content": problem.question},
                              {"role": "assistant", "content": chat.reply(problem.answer, problem.reasoning)}])
    return conversations


@dataclass
class ConversationData:
    """What SFT and distillation train on: a JSONL file of conversations, generated cold-start ones, or both."""

    data: str | None = settings_field(None, "JSONL of {\"messages\": [...]} conversations (default: cold-start "
                                      "data generated from --tasks)", kind=str)
    tasks: str = settings_field("arithmetic,linear_equation,sorting,countdown", "tasks of the generated "
                                "conversations")
    examples: int | None = settings_field(None, "cold-start conversations to generate (default 4000, or 0 with "
                                          "--data; a number with --data mixes that many into it)", kind=int)
    max_difficulty: int = settings_field(2, "hardest level of the generated conversations")

    def validate(self) -> ConversationData:
        parse_tasks(self.tasks)
        if self.examples is not None and self.examples < 0:
            raise ValueError(f"--examples = {self.examples}: must be >= 0")
        if not 1 <= self.max_difficulty <= MAX_DIFFICULTY:
            raise ValueError(f"--max-difficulty = {self.max_difficulty}: must be in 1..{MAX_DIFFICULTY}")
        return self

    @property
    def generated(self) -> int:
        return self.examples if self.examples is not None else 0 if self.data else 4000


def conversations(source: ConversationData, seed: int) -> list[list[dict[str, str]]]:
    """The --data conversations with --examples generated ones mixed in (shuffled with the seed, so that the
    validation rows, the last ones, hold both kinds). With a mix the file may be empty: rejection sampling
    can verify nothing."""
    examples = source.validate().generated
    rows = read_conversations(Path(source.data), allow_empty=examples > 0) if source.data else []
    rows, dropped = without_held_out(rows)
    if dropped:
        print(f"note: dropped {dropped} conversations of {source.data} that ask a held-out evaluation question",
              flush=True)
    if source.data and not rows:
        print(f"note: {source.data} holds no conversations; training on the {examples} generated ones", flush=True)
    rows += cold_start(parse_tasks(source.tasks), examples, source.max_difficulty, seed) if examples else []
    if source.data and examples:
        random.Random(seed).shuffle(rows)
    if not rows:
        raise ValueError("--examples 0 without --data: no conversations to train on")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory to start from (with its tokenizer)")
    add_flags(parser, ConversationData)
    add_run_arguments(parser, "runs/sft")
    add_train_arguments(parser, PRETRAIN_ONLY, max_steps=200, lr=5e-4, warmup_steps=10, seq_len=256)


def run(args: argparse.Namespace) -> int:
    """One process, or data-parallel under torchrun (each rank its own rows of every batch)."""
    return run_distributed(_run, args)


def _run(args: argparse.Namespace, rank: int, device: torch.device) -> int:
    out = Path(args.out)
    config = train_config_from(args, PRETRAIN_ONLY)
    rows = conversations(settings_from(ConversationData, args), config.seed)
    model = load_model(args.model, device=device, dtype=torch.float32)
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None or not tokenizer.chat_template:
        raise ValueError(f"--model {args.model}: SFT needs a tokenizer with a chat_template in the checkpoint")
    data = ChatSequences(rows, tokenizer, config.seq_len, config.seed)
    trainer = Trainer(model, tokenizer, data, config, out, resume=args.resume)
    if rank == 0:
        print(f"sft: {len(rows)} conversations, {config.max_steps} steps of {config.batch_size} x "
              f"{config.seq_len} tokens from {args.model}")
    last = trainer.run()
    if rank == 0:
        print(f"done: loss {last.get('loss', float('nan')):.3f}, validation loss "
              f"{last.get('val_loss', float('nan')):.3f}; checkpoint {out / 'latest'}")
    return 0
