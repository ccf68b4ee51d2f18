"""`nanoseek sft`: supervised fine-tuning on conversations, loss on the assistant's tokens only; the same
training loop as pretraining with chat data. Without `--data`, cold-start data in the R1 format is generated
from the verifiable tasks (spec grpo-r1.md §2.5: a small SFT before reasoning RL)."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..data import ChatSequences, read_conversations
from ..tasks import Problem, parse_tasks, training_problem
from ..tokenizer import THINK_CLOSE, THINK_OPEN, Tokenizer
from .loop import Trainer, add_train_arguments, run_distributed, train_config_from


def r1_reply(problem: Problem) -> str:
    """The assistant turn of the R1 format: reasoning in a think block, then the answer."""
    return f"{THINK_OPEN}\n{problem.reasoning}\n{THINK_CLOSE}\nThe answer is {problem.answer}."


def cold_start(tasks: list[str], examples: int, max_difficulty: int, seed: int) -> list[list[dict[str, str]]]:
    """Conversations of worked solutions from the tasks' training split."""
    conversations = []
    for index in range(examples):
        task = tasks[index % len(tasks)]
        problem = training_problem(task, seed * 1_000_003 + index, 1 + index % max_difficulty)
        conversations.append([{"role": "user", "content": problem.question},
                              {"role": "assistant", "content": r1_reply(problem)}])
    return conversations


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory to start from (with its tokenizer)")
    parser.add_argument("--data", help="JSONL of {\"messages\": [...]} conversations (default: cold-start data "
                        "generated from --tasks)")
    parser.add_argument("--tasks", default="arithmetic,linear_equation,sorting,countdown")
    parser.add_argument("--examples", type=int, default=None, help="cold-start conversations to generate "
                        "(default 4000, or 0 with --data; a number with --data mixes that many into it)")
    parser.add_argument("--max-difficulty", type=int, default=2)
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
    tasks = parse_tasks(args.tasks)
    model = load_model(args.model, device=device, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(args.model)
    if tokenizer is None or not tokenizer.chat_template:
        raise ValueError(f"--model {args.model}: SFT needs a tokenizer with a chat_template in the checkpoint")
    examples = args.examples if args.examples is not None else 0 if args.data else 4000
    if examples < 0:
        raise ValueError(f"--examples = {examples}: must be >= 0")
    conversations = read_conversations(Path(args.data)) if args.data else []
    conversations += cold_start(tasks, examples, args.max_difficulty, config.seed) if examples else []
    if args.data and examples:  # a mix: shuffled, so that the validation rows (the last ones) hold both kinds
        random.Random(config.seed).shuffle(conversations)
    if not conversations:
        raise ValueError("--examples 0 without --data: no conversations to train on")
    data = ChatSequences(conversations, tokenizer, config.seq_len, config.seed)
    trainer = Trainer(model, tokenizer, data, config, out, resume=args.resume)
    if rank == 0:
        print(f"sft: {len(conversations)} conversations, {config.max_steps} steps of {config.batch_size} x "
              f"{config.seq_len} tokens from {args.model}")
    last = trainer.run()
    if rank == 0:
        print(f"done: loss {last.get('loss', float('nan')):.3f}, validation loss "
              f"{last.get('val_loss', float('nan')):.3f}; checkpoint {out / 'latest'}")
    return 0
