"""`nanoseek sft`: supervised fine-tuning on conversations, loss on the assistant's tokens only; the same
training loop as pretraining with chat data. Without `--data`, cold-start data in the R1 format is generated
from the verifiable tasks (DeepSeek-R1 §2.3.1: a small cold-start SFT before
reasoning RL)."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..data import ChatSequences, read_conversations
from ..r1 import ChatLayout
from ..tasks import MAX_DIFFICULTY, parse_tasks, training_problem, without_held_out
from ..tokenizer import Tokenizer
from .loop import Trainer, add_train_arguments, run_distributed, train_config_from


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


def add_data_arguments(parser: argparse.ArgumentParser, data_help: str) -> None:
    """--data, --tasks, --examples, --max-difficulty: what `conversations` reads (SFT and distillation)."""
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--tasks", default="arithmetic,linear_equation,sorting,countdown")
    parser.add_argument("--examples", type=int, default=None, help="cold-start conversations to generate "
                        "(default 4000, or 0 with --data; a number with --data mixes that many into it)")
    parser.add_argument("--max-difficulty", type=int, default=2)


def conversations(args: argparse.Namespace, seed: int) -> list[list[dict[str, str]]]:
    """The --data conversations with --examples generated ones mixed in (shuffled with the seed, so that the
    validation rows, the last ones, hold both kinds). With a mix the file may be empty: rejection sampling
    can verify nothing."""
    tasks = parse_tasks(args.tasks)
    examples = args.examples if args.examples is not None else 0 if args.data else 4000
    if examples < 0:
        raise ValueError(f"--examples = {examples}: must be >= 0")
    if not 1 <= args.max_difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"--max-difficulty = {args.max_difficulty}: must be in 1..{MAX_DIFFICULTY}")
    rows = read_conversations(Path(args.data), allow_empty=examples > 0) if args.data else []
    rows, dropped = without_held_out(rows)
    if dropped:
        print(f"note: dropped {dropped} conversations of {args.data} that ask a held-out evaluation question",
              flush=True)
    if args.data and not rows:
        print(f"note: {args.data} holds no conversations; training on the {examples} generated ones", flush=True)
    rows += cold_start(tasks, examples, args.max_difficulty, seed) if examples else []
    if args.data and examples:
        random.Random(seed).shuffle(rows)
    if not rows:
        raise ValueError("--examples 0 without --data: no conversations to train on")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory to start from (with its tokenizer)")
    add_data_arguments(parser, "JSONL of {\"messages\": [...]} conversations (default: cold-start data generated "
                       "from --tasks)")
    parser.add_argument("--out", default="runs/sft")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default=None)
    add_train_arguments(parser, max_steps=200, lr=5e-4, warmup_steps=10, seq_len=256)


def run(args: argparse.Namespace) -> int:
    """One process, or data-parallel under torchrun (each rank its own rows of every batch)."""
    return run_distributed(_run, args)


def _run(args: argparse.Namespace, rank: int, device: torch.device) -> int:
    out = Path(args.out)
    config = train_config_from(args)
    rows = conversations(args, config.seed)
    model = load_model(args.model, device=device, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(args.model)
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
