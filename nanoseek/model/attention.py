"""Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, §2.1; V3 paper §2.1.1) and its latent KV cache.

Each token is compressed to a latent of `kv_lora_rank + qk_rope_head_dim` values: the normalised `c_kv`
and the roped, head-shared key `k_pe`. That latent is all the cache holds. Two execution paths run over the
same weights and the same latents:

* expanded ("MHA mode", training and prefill): `kv_b_proj` expands each latent to per-head keys and values,
  then ordinary attention;
* absorbed ("MQA mode", decode): `W^UK` is folded into the query and `W^UV` into the output
  (DeepSeek-V3 `inference/model.py`, `attn_impl = "absorb"`), so
  every head attends directly over the shared latents, as one multi-query attention of width d_c + d_r.

DeepSeek-V3.2 adds DeepSeek Sparse Attention (`indexer.py`): the cache row of a token also holds its indexer
key, and once a query sees more than `index_topk` keys, both paths attend only over the keys the indexer
selects for it (a mask over the same latents, so prefix caching and slots work as before).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .indexer import (
    INT8_EXACT_DIM,
    IndexerProbe,
    IndexerStats,
    IndexKeys,
    LightningIndexer,
    QuantizedKeys,
    indexer_loss,
    quantize_int8,
)
from .layers import Linear, RMSNorm
from .rope import apply_rope, softmax_scale

# The sparse path's working sets per chunk of queries, in elements: its index scores, and its gathered latents
# (sized to stay in a CPU's cache between the two products that read them).
SPARSE_SCORES_ELEMENTS = 1 << 24
SPARSE_GATHER_ELEMENTS = 1 << 21


class LatentCache:
    """Preallocated latent KV cache: `data[layer]` is [num_slots, max_len, kv_lora_rank + qk_rope_head_dim];
    for DeepSeek-V3.2, `index[layer]` beside it is [num_slots, max_len, index_head_dim], the indexer keys, in
    the cache's dtype or, with `index_dtype=torch.int8`, as int8 with one fp32 scale per key in `index_scale`
    (`QuantizedKeys`).

    A slot holds one sequence; position p of a slot holds the latent of that sequence's token at position p.
    The indexer keys have a tensor of their own because the indexer reads them for every token at every step,
    and as a strided part of the latent rows that read runs several times slower.
    """

    def __init__(self, config: ModelConfig, num_layers: int, num_slots: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 index_dtype: torch.dtype | None = None):
        if index_dtype not in (None, torch.int8):
            raise ValueError(f"index_dtype = {index_dtype}: the indexer keys are kept in the cache's dtype (None) "
                             "or as torch.int8")
        if index_dtype is not None and config.index_cache_dim > INT8_EXACT_DIM:
            raise ValueError(f"index_dtype = torch.int8: index_head_dim {config.index_cache_dim} is wider than the "
                             f"{INT8_EXACT_DIM} values whose int8 dot products fp32 holds exactly")
        self.max_len = max_len
        shape = (num_layers, num_slots, max_len)
        self.data = torch.zeros(*shape, config.kv_cache_dim, device=device, dtype=dtype)
        self.index = self.index_scale = None
        if config.index_cache_dim:
            self.index = torch.zeros(*shape, config.index_cache_dim, device=device, dtype=index_dtype or dtype)
        if config.index_cache_dim and index_dtype is not None:
            self.index_scale = torch.zeros(*shape, 1, device=device, dtype=torch.float32)

    @property
    def num_slots(self) -> int:
        return self.data.shape[1]

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.data, self.index, self.index_scale) if t is not None]

    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers."""
        return sum(t.shape[0] * t.shape[3] * t.element_size() for t in self.tensors())

    def read(self, slot: int, start: int, stop: int) -> list[Tensor]:
        """Positions start..stop-1 of `slot`, every layer: a view [num_layers, stop - start, width] per tensor."""
        return [t[:, slot, start:stop] for t in self.tensors()]

    def write(self, slot: int, start: int, rows: list[Tensor]) -> None:
        """Put `read`'s rows at positions start.. of `slot`."""
        for tensor, part in zip(self.tensors(), rows, strict=True):
            tensor[:, slot, start: start + part.shape[1]] = part

    def copy(self, target: int, source: int, length: int) -> None:
        """Positions 0..length-1 of slot `source` into slot `target`."""
        for tensor in self.tensors():
            tensor[:, target, :length] = tensor[:, source, :length]


@dataclass
class CacheContext:
    """Where a forward pass reads and writes the cache: built once per forward; `layer(i)` gives layer i its
    part (a view of its own cache tensor, so that a layer's code never indexes by layer number and one compiled
    layer serves every layer: `LanguageModel.compile_decode`)."""

    data: Tensor  # [num_slots, max_len, D] for one layer; [num_layers, ...] for the whole cache
    slots: Tensor | None  # [B] slot of each batch row; None = rows 0..B-1 use slots 0..B-1
    positions: Tensor  # [B, T] absolute positions of the new tokens
    key_len: int  # keys 0..key_len-1 of each slot are read
    mask: Tensor | None  # [B, T, key_len] bool, True where a query may attend; None when all keys are visible
    index: Tensor | None = None  # the indexer keys beside `data` (DeepSeek-V3.2), shaped alike
    index_scale: Tensor | None = None  # their scales [..., 1] where they are int8
    causal: bool = False  # every row's new tokens are the last T positions: `mask` is the causal mask

    @classmethod
    def build(cls, cache: LatentCache, positions: Tensor, slots: Tensor | None, first_key: int = 0) -> CacheContext:
        """`first_key` > 0 hides cache positions that never hold a key (MTP depth k starts at position k)."""
        lowest, highest = (int(p) for p in positions.aminmax())
        key_len = highest + 1
        if key_len > cache.max_len:
            raise ValueError(f"position {key_len - 1} is beyond the cache length {cache.max_len}")
        mask, causal = None, False
        if positions.shape[1] > 1 or lowest != highest or first_key:  # else one token per row, all at one position
            keys = torch.arange(key_len, device=positions.device)
            mask = keys <= positions[..., None]
            if first_key:
                mask &= keys >= first_key
            steps = positions.shape[1]
            causal = not first_key and steps <= key_len and bool((positions == keys[key_len - steps:]).all())
        tensors = (cache.data, cache.index, cache.index_scale)
        if slots is not None and _consecutive(slots):
            # rows in slots s..s+B-1 (any batch of one, and most batches): a view of those slots, so that each
            # layer reads its keys in place; indexing by `slots` would copy every key of every row per layer
            first, count = int(slots[0]), slots.shape[0]
            tensors, slots = [None if t is None else t[:, first: first + count] for t in tensors], None
        return cls(tensors[0], slots, positions, key_len, mask, *tensors[1:], causal=causal)

    def layer(self, index: int) -> CacheContext:
        """This context over layer `index`'s part of the cache."""
        index_scale = None if self.index_scale is None else self.index_scale[index]
        return replace(self, data=self.data[index], index=None if self.index is None else self.index[index],
                       index_scale=index_scale)

    def store(self, latent: Tensor) -> Tensor:
        """Write latent [B, T, D] at (slot, position) of this layer's cache and return the keys [B, key_len, D]
        of each row."""
        return self._write(self.data, latent)

    def store_index(self, key: Tensor, views: bool = False) -> IndexKeys | list[IndexKeys]:
        """`store` for the indexer keys [B, T, index_head_dim], quantised first where the cache is int8."""
        if self.index is None:
            raise ValueError("CacheContext.store_index: this cache holds no indexer keys")
        if self.index_scale is None:
            return self._write(self.index, key, views)
        quantized = quantize_int8(key)
        values, scales = self._write(self.index, quantized.values, views), self._write(
            self.index_scale, quantized.scales, views)
        if not views:
            return QuantizedKeys(values, scales)
        return [QuantizedKeys(*row) for row in zip(values, scales, strict=True)]

    def store_rows(self, latent: Tensor, key: Tensor) -> tuple[list[Tensor], list[IndexKeys]]:
        """`store` and `store_index` for rows in scattered slots, returning each row's keys [1, key_len, D] as
        a view of its own slot: what sparse attention reads of them is k rows, not worth a copy of all."""
        return self._write(self.data, latent, views=True), self.store_index(key, views=True)

    def _write(self, layer_cache: Tensor, values: Tensor, views: bool = False) -> Tensor | list[Tensor]:
        if layer_cache.dim() != 3:
            raise ValueError("CacheContext.store: this context spans every layer; store through .layer(i)")
        batch = values.shape[0]
        rows = torch.arange(batch, device=values.device) if self.slots is None else self.slots
        layer_cache[rows[:, None], self.positions] = values.to(layer_cache.dtype)
        if views:
            return [layer_cache[slot: slot + 1, : self.key_len] for slot in rows.tolist()]
        if self.slots is None:
            return layer_cache[:batch, : self.key_len]
        return layer_cache[self.slots, : self.key_len]


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.latent_dim = config.v_head_dim, config.kv_lora_rank
        self.rope_interleave = config.rope_interleave
        self.scale = softmax_scale(config)
        d, heads, qk = config.hidden_size, config.num_attention_heads, config.qk_head_dim
        bias = config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = Linear(d, heads * qk, bias=False)
        else:
            self.q_a_proj = Linear(d, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(config.q_lora_rank, heads * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, config.kv_lora_rank + config.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(config.kv_lora_rank, heads * (config.qk_nope_head_dim + config.v_head_dim),
                                bias=False)
        self.o_proj = Linear(heads * config.v_head_dim, d, bias=bias)
        self.indexer = LightningIndexer(config) if config.index_cache_dim else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: CacheContext | None = None,
                absorbed: bool = False, probe: IndexerProbe | None = None) -> Tensor:
        """x [B, T, d]; cos/sin [B or 1, T, d_r/2]. Without a cache, attention is causal over x itself. A `probe`
        (training a V3.2 model) collects the indexer's loss and recall and says whether attention is sparse."""
        q_compressed = None if hasattr(self, "q_proj") else self.q_a_layernorm(self.q_a_proj(x))
        q_nope, q_pe = self.queries(x if q_compressed is None else q_compressed, cos, sin)
        latents, mask = self.latent(x, cos, sin), None
        # detached: the indexer never sends gradients into the model
        index_keys = None if self.indexer is None else self.indexer.key(x.detach(), cos, sin).to(latents.dtype)
        if cache is not None and cache.slots is not None and self._sparse_inference(cache.key_len, probe):
            return self.o_proj(self._sparse_by_row(x, q_compressed, cos, sin, q_nope, q_pe, latents, index_keys,
                                                   cache).flatten(2))
        if cache is not None:
            latents, mask = cache.store(latents), cache.mask
            index_keys = None if index_keys is None else cache.store_index(index_keys)
        latents, causal = latents.to(x.dtype), cache is None
        sparse = self.indexer is not None and latents.shape[1] > self.indexer.topk
        if self._sparse_inference(latents.shape[1], probe):  # a causal mask is left to `_sparse` to apply
            out = self._sparse(x, q_compressed, cos, sin, q_nope, q_pe, latents, index_keys,
                               None if cache is None or cache.causal else mask)
            return self.o_proj(out.flatten(2))
        if sparse or probe is not None:  # training: the selection as a mask over every key, gradients through it
            visible = mask if mask is not None else _causal_rows(
                latents.shape[1], x.shape[1], x.device).expand(x.shape[0], -1, -1)
            with torch.set_grad_enabled(probe is not None and torch.is_grad_enabled()):
                scores = self.indexer.scores(x.detach(), q_compressed.detach(), cos, sin, index_keys)
            selected = self.indexer.select(scores.detach(), visible)
            if probe is not None:
                self._probe(probe, scores, selected, visible, q_nope, q_pe, latents)
            if probe is None or probe.mode == "sparse":
                mask, causal = selected, False
        attend = self._absorbed if absorbed else self._expanded
        return self.o_proj(attend(q_nope, q_pe, latents, mask, causal).flatten(2))

    def _sparse_inference(self, key_len: int, probe: IndexerProbe | None) -> bool:
        """Whether attention over `key_len` keys is DSA's gathered form: past k keys, not in training."""
        return self.indexer is not None and key_len > self.indexer.topk and probe is None and \
            not torch.is_grad_enabled()

    def _sparse_by_row(self, x: Tensor, q_compressed: Tensor, cos: Tensor, sin: Tensor, q_nope: Tensor,
                       q_pe: Tensor, latents: Tensor, index_keys: Tensor, cache: CacheContext) -> Tensor:
        """`_sparse` for rows in scattered slots, a row at a time over views of its own slot (a batch over
        them would first copy every key of every row)."""
        latent_rows, key_rows = cache.store_rows(latents, index_keys)
        out = []
        for b in range(x.shape[0]):
            row, angle = slice(b, b + 1), slice(b, b + 1) if cos.shape[0] > 1 else slice(None)
            mask = None if cache.mask is None or cache.causal else cache.mask[row]
            out.append(self._sparse(x[row], q_compressed[row], cos[angle], sin[angle], q_nope[row], q_pe[row],
                                    latent_rows[b].to(x.dtype), key_rows[b], mask))
        return torch.cat(out)

    def queries(self, q_input: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head query parts q_nope [B, T, H, d_n] and roped q_pe [B, T, H, d_r] of x, or of the normalised
        compressed query c_q where the query is compressed."""
        q = self.q_proj(q_input) if hasattr(self, "q_proj") else self.q_b_proj(q_input)
        q = q.view(*q_input.shape[:2], self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos[..., None, :], sin[..., None, :], self.rope_interleave)

    def latent(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """What the cache stores per token: [normalised c_kv, roped k_pe], [B, T, d_c + d_r]."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope_dim], dim=-1)
        return torch.cat((self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin, self.rope_interleave)), dim=-1)

    def _expanded(self, q_nope: Tensor, q_pe: Tensor, keys: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """MHA mode (V3 paper eqs. 1-11): expand latents to per-head k, v; returns [B, T, H, d_v]."""
        batch, key_len = keys.shape[:2]
        c_kv, k_pe = keys.split([self.latent_dim, self.rope_dim], dim=-1)
        k_nope, v = self.kv_b_proj(c_kv).view(batch, key_len, self.num_heads, self.nope_dim + self.v_dim).split(
            [self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None].expand(-1, -1, self.num_heads, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        # contiguous [B, H, T, D]: CPU attention kernels are far slower on strided views
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
            attn_mask=None if mask is None else mask[:, None], is_causal=causal, scale=self.scale)
        return out.transpose(1, 2)

    def _latent_scores(self, q_nope: Tensor, q_pe: Tensor, latents: Tensor) -> Tensor:
        """Every head's scaled logits over the latents in the absorbed form, [B, T, H, key_len] in fp32."""
        batch, steps, heads = q_nope.shape[:3]
        w_uk = self.kv_b_proj.weight.view(heads, self.nope_dim + self.v_dim, self.latent_dim)[:, : self.nope_dim]
        q_latent = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # absorb W^UK into the query
        q = torch.cat((q_latent, q_pe), dim=-1).reshape(batch, steps * heads, -1)
        return torch.bmm(q, latents.transpose(1, 2)).view(batch, steps, heads, -1).float() * self.scale

    def _absorbed(self, q_nope: Tensor, q_pe: Tensor, keys: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """MQA mode (the absorbed form of `inference/model.py`): all heads attend over the shared latents;
        returns [B, T, H, d_v]."""
        batch, steps, heads = q_nope.shape[:3]
        scores = self._latent_scores(q_nope, q_pe, keys)
        if causal:
            mask = torch.ones(steps, keys.shape[1], dtype=torch.bool, device=keys.device).tril()[None]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(keys.dtype).view(batch, steps * heads, -1)
        out_latent = torch.bmm(probs, keys[..., : self.latent_dim]).view(batch, steps, heads, -1)
        w_uv = self.kv_b_proj.weight.view(heads, self.nope_dim + self.v_dim, self.latent_dim)[:, self.nope_dim:]
        return torch.einsum("bthc,hvc->bthv", out_latent, w_uv)  # absorb W^UV into the output

    def _sparse(self, x: Tensor, q_compressed: Tensor, cos: Tensor, sin: Tensor, q_nope: Tensor, q_pe: Tensor,
                latents: Tensor, index_keys: IndexKeys, mask: Tensor | None) -> Tensor:
        """DeepSeek Sparse Attention as deployed (V3.2-Exp report eq. 2): each query attends, in the absorbed
        form, over only the `index_topk` latents its indexer scores highest, gathered: O(k) work per query
        beside the indexer's O(L). Queries are scored in chunks that keep the index scores small, and attend in
        smaller ones whose gathered latents stay in cache. `mask` None: causal (a decode step sees every key;
        several queries mask the last T keys' scores themselves). Returns [B, T, H, d_v]."""
        batch, steps = x.shape[:2]
        key_len, topk = latents.shape[1], self.indexer.topk
        per_query = batch * self.indexer.num_heads * key_len
        # all queries at once when they fit: a chunk size computed from key_len would make a compiled decode
        # step guard on it, and so recompile at nearly every new length
        scored = steps if steps * per_query <= SPARSE_SCORES_ELEMENTS else max(1, SPARSE_SCORES_ELEMENTS // per_query)
        attended = max(1, SPARSE_GATHER_ELEMENTS // (batch * topk * latents.shape[-1]))
        if isinstance(index_keys, Tensor):
            index_keys = index_keys.float()  # once, not per chunk, when the cache is bf16
        elif scored < steps:  # chunks of a prefill: the keys of their (exact) float products converted once
            index_keys = QuantizedKeys(index_keys.values.float(), index_keys.scales)
        out = []
        for start in range(0, steps, scored):
            part = slice(start, start + scored)
            scores = self.indexer.scores(x[:, part], q_compressed[:, part], cos[:, part], sin[:, part], index_keys)
            if mask is not None:
                chosen, valid = self.indexer.top_keys(scores, mask[:, part])  # [B, c, k]
            elif steps > 1:
                chosen, valid = self._causal_top_keys(scores, key_len, steps, part)
            else:  # a decode step: every key is visible
                chosen, valid = self.indexer.top_keys(scores, None)
            for first in range(0, chosen.shape[1], attended):
                last = min(first + attended, chosen.shape[1])
                rows, queries = slice(first, last), slice(start + first, start + last)
                out.append(self._attend_chosen(q_nope[:, queries], q_pe[:, queries], latents, chosen[:, rows],
                                               None if valid is None else valid[:, rows]))
        return torch.cat(out, dim=1)

    def _causal_top_keys(self, scores: Tensor, key_len: int, steps: int, part: slice) -> tuple[Tensor, Tensor | None]:
        """`top_keys` for the queries `part` of the last `steps` under the causal mask. Only the last `steps`
        keys can be later than a query, so only their scores are masked (in place, not a [c, key_len] mask), and
        which chosen keys a query sees follows from its position (None when every query sees at least k)."""
        first = key_len - steps
        scores[..., first:].masked_fill_(~_causal_rows(steps, steps, scores.device)[part], float("-inf"))
        positions = torch.arange(first, key_len, device=scores.device)[part]
        chosen, _ = self.indexer.top_keys(scores, None)
        fewest_seen = first + part.start + 1  # by the part's first query
        return chosen, None if fewest_seen >= self.indexer.topk else chosen <= positions[:, None]

    def _attend_chosen(self, q_nope: Tensor, q_pe: Tensor, latents: Tensor, chosen: Tensor,
                       valid: Tensor | None) -> Tensor:
        """Absorbed attention of each query over its own `chosen` [B, c, k] latents (False in `valid`: none)."""
        batch, steps, heads = q_nope.shape[:3]
        # row by row: index_select copies whole latent rows, several times faster than gather here
        rows = [latents[b].index_select(0, chosen[b].flatten()) for b in range(batch)]
        picked = (rows[0][None] if batch == 1 else torch.stack(rows)).view(batch, steps, chosen.shape[-1], -1)
        w_kv_b = self.kv_b_proj.weight.view(heads, self.nope_dim + self.v_dim, self.latent_dim)
        q_latent = torch.einsum("bthn,hnc->bthc", q_nope, w_kv_b[:, : self.nope_dim])
        q = torch.cat((q_latent, q_pe), dim=-1) * self.scale  # scaled here: [c, H, d], not [c, H, k] after
        scores = torch.einsum("bthd,btkd->bthk", q, picked).float()
        if valid is not None:
            scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(latents.dtype)
        out_latent = torch.einsum("bthk,btkc->bthc", probs, picked[..., : self.latent_dim])
        return torch.einsum("bthc,hvc->bthv", out_latent, w_kv_b[:, self.nope_dim:])

    @torch.no_grad()
    def _attention_mass(self, q_nope: Tensor, q_pe: Tensor, latents: Tensor, mask: Tensor) -> Tensor:
        """The main attention's probabilities under `mask`, averaged over heads: [B, T, key_len], no gradient."""
        scores = self._latent_scores(q_nope, q_pe, latents).masked_fill(~mask[:, :, None], float("-inf"))
        return scores.softmax(dim=-1).mean(dim=2)

    def _probe(self, probe: IndexerProbe, scores: Tensor, selected: Tensor, visible: Tensor, q_nope: Tensor,
               q_pe: Tensor, latents: Tensor) -> None:
        """The indexer's loss for the probe's stage and its recall (V3.2-Exp report §2.1.1). The sparse stage's
        target is the sparse attention's own distribution over the selected keys (the main attention as it
        runs); recall needs the dense distribution, computed here for it alone."""
        dense = self._attention_mass(q_nope, q_pe, latents, visible)
        if probe.mode == "dense":
            loss = indexer_loss(scores, dense, visible)
        else:
            loss = indexer_loss(scores, self._attention_mass(q_nope, q_pe, latents, selected), selected)
        # recall over the queries that see more than k keys (the others' top-k is all they see)
        beyond = visible.sum(-1) > self.indexer.topk
        covered = (dense * selected).sum(-1)
        recall = covered[beyond].mean() if beyond.any() else covered.new_ones(())
        probe.stats.append(IndexerStats(loss, recall))

def _consecutive(slots: Tensor) -> bool:
    """Whether `slots` [B] are s, s + 1, ..., s + B - 1."""
    return bool((slots.diff() == 1).all()) if slots.shape[0] > 1 else True


def _causal_rows(key_len: int, steps: int, device: torch.device) -> Tensor:
    """The causal mask [steps, key_len] of the last `steps` of `key_len` positions (True = may attend): row i is
    the query at position key_len - steps + i."""
    queries = torch.arange(key_len - steps, key_len, device=device)
    return torch.arange(key_len, device=device) <= queries[:, None]
