"""Prefix cache over the MLA latent cache: prompts that start alike skip recomputing their shared start.

A token's latent (c_kv and k_pe per layer) depends only on the tokens up to it, so the latents of a prompt's
first k blocks can be copied from any earlier prompt with the same first k blocks. Blocks are `block_size`
tokens, keyed by a hash chained over all the tokens before and in them (DeepSeek's API caches in 64-token
units: its context-caching guide); the pool keeps the most recently used `max_tokens` worth and drops the least
recently used. MLA latents are small (the nano model: 1.3 KB per token over all layers), so reuse is a copy.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from ..model.attention import LatentCache


class PrefixCache:
    def __init__(self, cache: LatentCache, block_size: int = 16, max_tokens: int = 65536):
        if block_size < 1 or max_tokens < block_size:
            raise ValueError(f"prefix cache: block_size = {block_size}, max_tokens = {max_tokens}: need "
                             "block_size >= 1 and max_tokens >= block_size")
        self.block_size, rows = block_size, max_tokens // block_size
        # one pool per cache tensor (latents; indexer keys and their scales), each in that tensor's dtype
        self.pools = [torch.zeros(rows, t.shape[0], block_size, t.shape[3], dtype=t.dtype, device=t.device)
                      for t in cache.tensors()]
        self.index: OrderedDict[bytes, int] = OrderedDict()  # block key -> pool row, least recently used first
        self.free = list(range(rows - 1, -1, -1))
        self.hit_tokens = self.queried_tokens = 0

    def _keys(self, ids: list[int], blocks: int) -> list[bytes]:
        keys, digest = [], b""
        for b in range(blocks):
            chunk = ids[b * self.block_size: (b + 1) * self.block_size]
            digest = hashlib.blake2b(digest + b"".join(t.to_bytes(4, "little") for t in chunk),
                                     digest_size=16).digest()
            keys.append(digest)
        return keys

    def load(self, ids: list[int], cache: LatentCache, slot: int) -> int:
        """Copy the longest cached prefix of `ids` into `slot` (leaving at least one token to run, whose
        logits give the first new token); returns its length in tokens."""
        keys = self._keys(ids, (len(ids) - 1) // self.block_size)
        hits = 0
        for key in keys:
            row = self.index.get(key)
            if row is None:
                break
            self.index.move_to_end(key)
            start = hits * self.block_size
            cache.write(slot, start, [pool[row] for pool in self.pools])
            hits += 1
        self.queried_tokens += len(ids)
        self.hit_tokens += hits * self.block_size
        return hits * self.block_size

    def store(self, ids: list[int], cache: LatentCache, slot: int) -> None:
        """Keep the full blocks of `ids`, whose latents are now in `slot`."""
        for b, key in enumerate(self._keys(ids, len(ids) // self.block_size)):
            if key in self.index:
                self.index.move_to_end(key)
                continue
            if not self.free:
                _, row = self.index.popitem(last=False)
                self.free.append(row)
            row = self.free.pop()
            blocks = cache.read(slot, b * self.block_size, (b + 1) * self.block_size)
            for pool, block in zip(self.pools, blocks, strict=True):
                pool[row] = block
            self.index[key] = row

    @property
    def cached_tokens(self) -> int:
        return len(self.index) * self.block_size
