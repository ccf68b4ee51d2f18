"""Chat-formatted training data: conversations rendered with the tokenizer's chat template, with the loss on
the assistant's tokens only (per-token masks), batched like PackedSequences so the training loop is unchanged."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..r1 import THINK_OPEN
from ..tokenizer import Tokenizer
from .shards import Batch, ShuffledBatches
from .sources import DataError, iter_jsonl

IGNORE = -100


def read_conversations(file: Path, field: str = "messages", allow_empty: bool = False) -> list[list[dict[str, str]]]:
    """JSONL with one conversation per line: {"messages": [{"role": ..., "content": ...}, ...]}."""
    conversations = []
    for number, record in iter_jsonl(file):
        messages = record.get(field) if isinstance(record, dict) else None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise DataError(f"{file}:{number}: field {field!r} must be a list of {{role, content}} messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{file}:{number}: the conversation has no assistant message to learn from")
        conversations.append(messages)
    if not conversations and not allow_empty:
        raise DataError(f"{file}: no conversations")
    return conversations


def tokenize_conversation(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is assistant output to learn.

    Each message's tokens are the difference between renderings of the conversation up to it and up to the one
    before; template text around an assistant message (its role marker) is not learned, its content and the
    end-of-turn token are.
    """
    ids: list[int] = []
    learn: list[bool] = []
    for i, message in enumerate(messages):
        text = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
            # the template opens the think block in the prompt; the data's reply carries its own
            prompt = prompt.removesuffix(THINK_OPEN + "\n")
            prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
            full = tokenizer.encode(text, add_special_tokens=False)
            learn += [False] * (len(prompt_ids) - len(ids)) + [True] * (len(full) - len(prompt_ids))
        else:
            full = tokenizer.encode(text, add_special_tokens=False)
            learn += [False] * (len(full) - len(ids))
        ids = full
    return ids, learn


class ChatSequences(ShuffledBatches):
    """Conversations as [seq_len] rows: inputs padded, targets IGNORE outside assistant tokens."""

    def __init__(self, conversations: Iterable[list[dict[str, str]]], tokenizer: Tokenizer, seq_len: int, seed: int,
                 val_fraction: float = 0.05):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        inputs, targets, lengths = [], [], []
        for messages in conversations:
            ids, learn = tokenize_conversation(tokenizer, messages)
            ids, learn = ids[: seq_len + 1], learn[: seq_len + 1]
            row = [t if keep else IGNORE for t, keep in zip(ids[1:], learn[1:], strict=True)]
            padding = seq_len - len(row)
            inputs.append(ids[:-1] + [pad] * padding)
            targets.append(row + [IGNORE] * padding)
            lengths.append(len(row))
        self.inputs, self.targets = torch.tensor(inputs), torch.tensor(targets)
        self.real = torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]
        super().__init__(len(inputs), seq_len, seed, val_fraction)

    def _take(self, rows: list[int]) -> Batch:
        index = torch.tensor(rows, dtype=torch.long)
        return Batch(self.inputs[index], self.targets[index], self.real[index])
