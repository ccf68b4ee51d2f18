"""Token shards and packed training sequences.

Documents are tokenised once (BOS first, EOS after each, the document boundary) into memory-mapped uint32
shards described by `manifest.json`. Training reads fixed-length windows of seq_len + 1 tokens packed across
documents, in an order shuffled deterministically per epoch; the last windows are the validation split. The
reader's position is a small dict saved in every checkpoint, so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..tokenizer import Tokenizer
from .sources import DataError

MANIFEST = "manifest.json"
SHARD_TOKENS = 1 << 24


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()[:16]


def build_shards(documents: Iterable[str], tokenizer: Tokenizer, out: Path, source: str,
                 shard_tokens: int = SHARD_TOKENS) -> dict:
    """Tokenise documents into `out/shard-*.bin` and write the manifest last (so a crash leaves no manifest)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token to mark document boundaries")
    shards, buffer, documents_seen, total = [], [], 0, 0

    def flush() -> None:
        nonlocal buffer
        if buffer:
            name = f"shard-{len(shards):05d}.bin"
            array = np.concatenate(buffer).astype(np.uint32)
            array.tofile(out / name)
            shards.append({"file": name, "tokens": int(array.size)})
            buffer = []

    batch: list[str] = []
    pending = 0
    for document in itertools.chain(documents, [None]):
        if document is not None:
            batch.append(document)
            if len(batch) < 1024:
                continue
        for ids in tokenizer.encode_batch(batch):
            buffer.append(np.asarray(ids + [eos], dtype=np.uint32))
            pending += len(ids) + 1
            total += len(ids) + 1
            documents_seen += 1
            if pending >= shard_tokens:
                flush()
                pending = 0
        batch = []
    flush()
    if total == 0:
        raise DataError(f"{source}: no documents (the data is empty)")
    manifest = {"source": source, "documents": documents_seen, "tokens": total, "shards": shards,
                "tokenizer": tokenizer_fingerprint(tokenizer), "vocab_size": tokenizer.vocab_size}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def load_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class TokenStream:
    """All shards of a manifest as one sequence of token ids (memory-mapped, never fully loaded)."""

    def __init__(self, out: Path, manifest: dict):
        self.arrays = [np.memmap(out / s["file"], dtype=np.uint32, mode="r") for s in manifest["shards"]]
        self.starts = np.cumsum([0] + [a.size for a in self.arrays])
        self.size = int(self.starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        pieces, position, end = [], start, start + length
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while position < end:
            array, offset = self.arrays[shard], position - self.starts[shard]
            take = min(end - position, array.size - offset)
            pieces.append(array[offset: offset + take])
            position += take
            shard += 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T], -100 where no loss is taken
    real: torch.Tensor | None = None  # [B, T] bool, False at padding (which must not count as expert load)


class ShuffledBatches:
    """Rows 0..train_windows-1 for training, visited in an order reshuffled each epoch from the seed; the
    next val_windows rows for validation. Subclasses say how to turn row numbers into a Batch (`_take`)."""

    def __init__(self, rows: int, seq_len: int, seed: int, val_fraction: float, source: str = ""):
        self.source = source  # what the rows come from: a position only means something for the same data
        if rows < 2:
            raise DataError(f"the data makes {rows} sequence(s) of {seq_len} tokens: too few for training and "
                            "validation (use more data or a shorter --seq-len)")
        self.seq_len, self.seed = seq_len, seed
        self.val_windows = max(1, int(rows * val_fraction))
        self.train_windows = rows - self.val_windows
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _take(self, rows: list[int]) -> Batch:
        raise NotImplementedError

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(self.train_windows, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def next_batch(self, size: int, rank: int = 0, world: int = 1) -> Batch:
        """The next `size` sequences of this rank; all ranks together advance by size * world."""
        picked = []
        for _ in range(size * world):
            if self.index == self.train_windows:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            picked.append(int(self._order[self.index]))
            self.index += 1
        return self._take(picked[rank * size:(rank + 1) * size])

    def validation(self, size: int, limit: int) -> Iterable[Batch]:
        rows = list(range(self.train_windows, self.train_windows + self.val_windows))[: size * limit]
        for start in range(0, len(rows), size):
            yield self._take(rows[start: start + size])

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "train_windows": self.train_windows, "source": self.source}

    def load_state(self, state: dict) -> None:
        if state.get("seq_len") != self.seq_len or state.get("seed") != self.seed:
            raise DataError(f"the checkpoint's data position is for seq_len {state.get('seq_len')} and seed "
                            f"{state.get('seed')}, not {self.seq_len} and {self.seed}")
        if state.get("train_windows") != self.train_windows or state.get("source", "") != self.source:
            raise DataError("the checkpoint was trained on other data (a different source or size): resuming "
                            "needs the same data")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation()


class PackedSequences(ShuffledBatches):
    """Fixed windows of seq_len + 1 tokens over a token stream, packed across documents."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int, val_fraction: float = 0.05, source: str = ""):
        self.stream = stream
        super().__init__((stream.size - 1) // seq_len, seq_len, seed, val_fraction, source)

    def _take(self, windows: list[int]) -> Batch:
        rows = np.stack([self.stream.window(w * self.seq_len, self.seq_len + 1) for w in windows]).astype(np.int64)
        tokens = torch.from_numpy(rows)
        return Batch(tokens[:, :-1], tokens[:, 1:].clone())
