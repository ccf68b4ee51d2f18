"""DeepSeek Sparse Attention's lightning indexer (the DeepSeek-V3.2-Exp report, §2.1, eq. 1; DeepSeek-V3.2-Exp's
`inference/model.py` `Indexer`; transformers' `DeepseekV32Indexer`).

For query token t and earlier token s the index score is I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]): a few
heads j of small width, one key per token shared by all heads, per-token head weights w. MLA then attends only
over the `index_topk` keys with the highest scores, O(k L) instead of O(L^2). The indexer's RoPE rotates the
first `qk_rope_head_dim` values of each vector as two halves (not interleaved pairs, unlike MLA's).

The released model scores in FP8 after a Hadamard rotation of q and k; the rotation is orthogonal (dot products
unchanged), so this fp32 form is the same function up to the FP8 rounding. A cache may instead keep the keys as
`QuantizedKeys`, int8 with one scale per key: the CPU's counterpart of that FP8 cache (e4m3, one scale per 128
values: V3.2-Exp's `act_quant`), a quarter of fp32's bytes, scored by int8 dot products.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from ..config import DeepSeekV32Config
from .layers import Linear
from .rope import apply_rope


class QuantizedKeys(NamedTuple):
    """Indexer keys as int8 values and one fp32 scale per key: key = values * scales."""

    values: Tensor  # [B, L, D] int8, or the same integers as fp32 (converted once for a prefill's chunks)
    scales: Tensor  # [B, L, 1] fp32


IndexKeys = Tensor | QuantizedKeys
INT8_EXACT_DIM = 1040  # the widest int8 vectors whose dot products fp32 holds exactly: 1040 * 127^2 < 2^24


def quantize_int8(x: Tensor) -> QuantizedKeys:
    """Symmetric int8 over the last dimension, one scale per vector (absmax / 127)."""
    # the floor after the division: a subnormal scale would flush to zero where denormals do, and 0 / 0 is NaN
    scales = (x.abs().amax(-1, keepdim=True).float() / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return QuantizedKeys((x / scales).round_().clamp_(-127, 127).to(torch.int8), scales)


def int8_logits(q: Tensor, keys: Tensor) -> Tensor:
    """q [B, T, H, D] . keys [B, L, D], int8 (the keys possibly as fp32 copies of int8 values), as [B, T, H, L]
    fp32. Exact: |q . k| <= D * 127^2 stays within fp32's integers for D <= INT8_EXACT_DIM, so a float product
    of the int8 values gives the same numbers."""
    batch, steps, heads, dim = q.shape
    if q.device.type != "cpu" or steps * heads > 32 or keys.dtype != torch.int8:
        # many query rows (prefill) or not the CPU: fp32 GEMMs are as fast, without an int32 result to convert
        return torch.einsum("bthd,bkd->bthk", q.float(), keys.float())
    # torch._int_mm: int8 x int8 -> int32 on oneDNN's VNNI/AMX kernels, with the keys as the left operand:
    # for a decode step 32K keys of 64 take 0.08 ms, against 0.22 ms for the fp32 product of fp32 keys
    rows = [torch._int_mm(keys[b], q[b].reshape(steps * heads, dim).T.contiguous()).T for b in range(batch)]
    rows = [row.reshape(steps, heads, -1) for row in rows]
    return (rows[0][None] if batch == 1 else torch.stack(rows)).float()


# Selection by threshold (`highest_positions`): every SAMPLE_STRIDE-th score is sampled, and the
# (1 + SAMPLE_MARGIN) k / SAMPLE_STRIDE-th highest of the sample is a threshold that about 1.25 k scores pass
SAMPLE_STRIDE, SAMPLE_MARGIN, THRESHOLD_ROWS = 16, 0.25, 8


@torch.library.custom_op("nanoseek::highest_positions", mutates_args=())
def highest_positions(scores: Tensor, k: int) -> Tensor:
    """The positions [..., k] of the k highest of each row of `scores` [..., L], ascending (so that a gather
    of them reads forward through memory). Exact, as topk; for a few long rows (a decode step) faster: a
    threshold from a strided sample keeps about 1.25 k candidates, and the k-th highest of those selects
    from them in the order of their positions (2,048 of 32K: 0.10 ms against topk and sort's 0.25 on 2
    cores). An operator of its own so that a compiled decode step calls it without breaking its graph."""
    rows = scores.reshape(-1, scores.shape[-1])
    sampled = int(k * (1 + SAMPLE_MARGIN)) // SAMPLE_STRIDE
    # the threshold's candidates are found by nonzero, a host sync on a GPU; a small sample is not to be trusted
    if rows.shape[0] > THRESHOLD_ROWS or rows.shape[-1] < 4 * k or sampled < 8 or scores.device.type != "cpu":
        return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    return torch.stack([_highest_in_row(row, k, sampled) for row in rows]).view(*scores.shape[:-1], k)


def _highest_in_row(row: Tensor, k: int, sampled: int) -> Tensor:
    threshold = row[::SAMPLE_STRIDE].topk(sampled, sorted=False).values.min()
    candidates = (row >= threshold).nonzero().squeeze(-1)
    if candidates.numel() < k:  # the sample misled: fewer than k pass
        return row.topk(k, sorted=False).indices.sort().values
    values = row[candidates]
    chosen = candidates[values >= values.kthvalue(candidates.numel() - k + 1).values]
    if chosen.numel() != k:  # ties at the k-th value: topk breaks them
        chosen = candidates[values.topk(k, sorted=False).indices.sort().values]
    return chosen


@highest_positions.register_fake
def _(scores: Tensor, k: int) -> Tensor:
    return scores.new_empty(*scores.shape[:-1], k, dtype=torch.long)


class LightningIndexer(nn.Module):
    """Checkpoint names `self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`, as the released V3.2 weights."""

    def __init__(self, config: DeepSeekV32Config):
        super().__init__()
        self.num_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.rope_dim, self.topk = config.qk_rope_head_dim, config.index_topk
        self.wq_b = Linear(config.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.wk = Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)  # a LayerNorm with bias, not an RMSNorm
        self.weights_proj = Linear(config.hidden_size, self.num_heads, bias=False)

    def _apply(self, fn, recurse=True):
        # transformers keeps weights_proj in fp32 (`_keep_in_fp32_modules`): the per-token head weights decide a
        # discrete top-k, which bf16 rounding would change
        super()._apply(fn, recurse)
        weight = self.weights_proj.weight
        if weight.is_floating_point() and weight.dtype != torch.float32:
            weight.data = weight.data.float()
        return self

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        rotated, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rope(rotated, cos, sin, interleaved=False), rest), dim=-1)

    def key(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The indexer key of each token, [B, T, index_head_dim]: what the cache keeps beside the latent."""
        return self._rope(self.k_norm(self.wk(x)), cos, sin)

    def scores(self, x: Tensor, q_compressed: Tensor, cos: Tensor, sin: Tensor, keys: IndexKeys) -> Tensor:
        """Index scores I [B, T, key_len] in fp32 (eq. 1) of the T queries over `keys` [B, key_len, D].

        `q_compressed` is MLA's normalised compressed query c_q [B, T, q_lora_rank]. With `QuantizedKeys` the
        queries are quantised alike (one scale per head) and the dot products are int8's."""
        batch, steps = x.shape[:2]
        q = self.wq_b(q_compressed).view(batch, steps, self.num_heads, self.head_dim)
        q = self._rope(q, cos[..., None, :], sin[..., None, :]).float()
        # ReLU(c a) = c ReLU(a) for c > 0: the logits' 1 / sqrt(D) and the int8 scales move onto the head
        # weights and the result, off the [B, T, H, key_len] logits, which are then read once more, not thrice
        weights = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * (
            self.num_heads * self.head_dim) ** -0.5
        if isinstance(keys, QuantizedKeys):
            q_int8 = quantize_int8(q)
            logits, weights = int8_logits(q_int8.values, keys.values), weights * q_int8.scales[..., 0]
        else:
            logits = torch.einsum("bthd,bkd->bthk", q, keys.float())
        scores = torch.einsum("bth,bthk->btk", weights, logits.relu_())
        return scores if isinstance(keys, Tensor) else scores.mul_(keys.scales[..., 0][:, None])

    def top_keys(self, scores: Tensor, visible: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(the k keys [B, T, k] of each query's highest scores among its `visible` ones (None: every key), in
        ascending order, so that a gather of them reads forward through memory; which of them are visible, as
        early queries see fewer than k). The one selection both the mask and the gathered attention use."""
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        chosen = highest_positions(scores, self.topk)
        valid = None if visible is None else visible.expand(chosen.shape[0], -1, -1).gather(-1, chosen)
        return chosen, valid

    def select(self, scores: Tensor, visible: Tensor) -> Tensor:
        """The attention mask [B, T, key_len] (True = attend) of the top-k visible keys of each query; all
        visible keys when there are no more than k."""
        if scores.shape[-1] <= self.topk:
            return visible
        chosen, valid = self.top_keys(scores, visible)
        return torch.zeros_like(visible).scatter_(-1, chosen, valid)


# ---- training (the V3.2-Exp report §2.1.1) -------------------------------------------------------------
DSAMode = Literal["dense", "sparse"]


@dataclass
class IndexerStats:
    """One attention layer's indexer during training."""

    loss: Tensor  # scalar: the mean over query tokens of KL(p_t || softmax(I_t)); its gradient reaches the indexer
    recall: Tensor  # scalar, no gradient: the mean share of the dense attention's mass on the top-k keys, over
    # the queries that see more than k keys (1 when none does)


@dataclass
class IndexerProbe:
    """Asks every attention layer of one forward pass for its `IndexerStats`.

    `mode` is the training stage: "dense" is the warm-up, where the main attention stays dense and the indexer
    learns the main attention's distribution over every visible key; "sparse" is sparse training, where the
    main attention reads the indexer's top-k keys and the indexer's loss covers those keys only. In both, the
    indexer's inputs are detached: it learns only from its loss, the rest of the model only from its own.
    """

    mode: DSAMode
    stats: list[IndexerStats] = field(default_factory=list)


def indexer_loss(scores: Tensor, target: Tensor, keep: Tensor) -> Tensor:
    """mean_t KL(p_t || softmax(I_t)) over the key set `keep` [B, T, K] (True = in the set) of each query.

    `target` [B, T, K] is the main attention's distribution, summed over heads; restricted to the set and
    L1-normalised it is p_t. The report sums over t; the mean keeps the loss's scale independent of the batch,
    as the language-model loss's is.
    """
    p = target.float() * keep
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    log_q = scores.float().masked_fill(~keep, float("-inf")).log_softmax(-1).masked_fill(~keep, 0.0)
    return (torch.xlogy(p, p) - p * log_q).sum(-1).mean()
