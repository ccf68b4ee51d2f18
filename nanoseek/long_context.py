"""`nanoseek eval-long`: a model's loss and pass-key retrieval on held-out long documents, per context length.

Each held-out document (`tasks.passkey`, keys and haystack of the evaluation split) is built to fill the
context: haystack documents are added while the whole still fits. One forward pass scores it: the mean
next-token loss over every position, and retrieval, right when the greedy token at every position of the
key's answer is the key's own (so greedy decoding would produce the key). A DeepSeek-V3.2 model runs as it
serves: sparse attention over its indexer's top-k once the context is longer than k.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import load_model
from .model import LanguageModel
from .tasks.passkey import ANSWER, PLANT, QUESTION, SEPARATOR, PasskeyDocument, draw_key, haystack
from .tokenizer import Tokenizer

DEPTH_BINS = 4
FIT_ATTEMPTS = 8


@dataclass(frozen=True)
class FittedDocument:
    """A held-out passkey document as token ids, and where its answer (the key) starts."""

    document: PasskeyDocument
    ids: list[int]
    answer_start: int


def _fits(tokenizer: Tokenizer, document: PasskeyDocument, tokens: int) -> FittedDocument | None:
    prompt = tokenizer.encode(document.prompt)
    ids = prompt + tokenizer.encode(document.answer, add_special_tokens=False)
    return FittedDocument(document, ids, len(prompt)) if len(ids) <= tokens else None


def fit_document(tokenizer: Tokenizer, tokens: int, rng: random.Random, stream: Iterator[str]) -> FittedDocument:
    """A document whose haystack, drawn from `stream`, fills `tokens` but for less than a haystack document's
    length (the key at a uniform depth)."""
    frame = PLANT.format(key=0) + QUESTION + ANSWER.format(key=0)
    budget = tokens - len(tokenizer.encode(frame)) - 8  # a little slack for merges across the joins
    parts, size, misses = [], 0, 0
    while misses < FIT_ATTEMPTS:  # a document too long for what is left is skipped for a shorter one
        part = next(stream)
        cost = len(tokenizer.encode(part + SEPARATOR, add_special_tokens=False))
        if size + cost > budget:
            misses += 1
            continue
        parts.append(part)
        size, misses = size + cost, 0
    document = PasskeyDocument(tuple(parts), rng.randint(0, len(parts)), draw_key(rng, "eval"))
    while (fitted := _fits(tokenizer, document, tokens)) is None:  # the joins merged differently: drop one
        if not parts:
            raise ValueError(f"--contexts: {tokens} tokens cannot hold a key, its question and its answer in this "
                             f"tokenizer ({len(tokenizer.encode(frame))} tokens)")
        parts.pop()
        document = PasskeyDocument(tuple(parts), min(document.depth, len(parts)), document.key)
    return fitted


@dataclass(frozen=True)
class Score:
    """One document's scores: summed next-token loss over `tokens` positions; whether every key token is the
    greedy one; the share of key tokens that are (a partial retrieval counts there)."""

    loss: float
    tokens: int
    retrieved: bool
    key_tokens_right: float


@torch.no_grad()
def score(model: LanguageModel, fitted: FittedDocument) -> Score:
    ids = torch.tensor([fitted.ids], device=model.device)
    logits = model.run(ids).logits[0].float()
    loss = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
    start = fitted.answer_start
    right = logits[start - 1: -1].argmax(-1) == ids[0, start:]
    return Score(loss, ids.shape[1] - 1, bool(right.all()), right.float().mean().item())


def evaluate_long(model: LanguageModel, tokenizer: Tokenizer, contexts: list[int], documents: int,
                  seed: int = 0) -> dict[str, dict]:
    """Per context length: mean loss per token, retrieval accuracy (percent of documents whose whole key is
    greedy), the percent of key tokens that are, and accuracy by the key's depth (quarters, first to last)."""
    report = {}
    for context in contexts:
        rng, stream = random.Random(f"eval-long:{seed}:{context}"), haystack(seed + context, "eval")
        scores, depths = [], []
        for _ in range(documents):
            fitted = fit_document(tokenizer, context, rng, stream)
            scores.append(score(model, fitted))
            depths.append(min(DEPTH_BINS - 1, int(fitted.document.relative_depth * DEPTH_BINS)))
        hits = [s.retrieved for s in scores]
        report[str(context)] = {
            "loss": sum(s.loss for s in scores) / sum(s.tokens for s in scores), "accuracy": _percent(hits),
            "key_tokens": _percent([s.key_tokens_right for s in scores]), "documents": documents,
            "by_depth": {f"q{b + 1}": _percent([h for h, d in zip(hits, depths, strict=True) if d == b])
                         for b in range(DEPTH_BINS)}}
    return report


def _percent(values: list[float]) -> float | None:
    return 100.0 * sum(values) / len(values) if values else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (with its tokenizer)")
    parser.add_argument("--contexts", default="2048,4096,8192", help="context lengths in tokens, comma-separated")
    parser.add_argument("--documents", type=int, default=50, help="held-out documents per context length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", help="also write the report to this file")


def parse_contexts(text: str) -> list[int]:
    try:
        contexts = [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise ValueError(f"--contexts {text!r}: comma-separated integers") from exc
    if any(c < 64 for c in contexts):
        raise ValueError(f"--contexts {text!r}: each must be at least 64 tokens (the key, question and answer)")
    return contexts


def run(args: argparse.Namespace) -> int:
    contexts = parse_contexts(args.contexts)
    if args.documents < 1:
        raise ValueError(f"--documents = {args.documents}: must be >= 1")
    tokenizer = Tokenizer.from_dir(args.model)
    if tokenizer is None:
        raise ValueError(f"--model {args.model}: no tokenizer.json there")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(args.model, device=device, dtype=torch.float32).eval()
    longest = model.config.max_position_embeddings
    if max(contexts) > longest:
        print(f"note: --contexts beyond the model's max_position_embeddings ({longest}) measure extrapolation",
              flush=True)
    report = {"model": str(args.model), "contexts": evaluate_long(model, tokenizer, contexts, args.documents,
                                                                  args.seed)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
