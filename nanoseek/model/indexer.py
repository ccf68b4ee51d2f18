"""DeepSeek Sparse Attention's lightning indexer (the DeepSeek-V3.2-Exp report, §2.1, eq. 1; DeepSeek-V3.2-Exp's
`inference/model.py` `Indexer`; transformers' `DeepseekV32Indexer`).

For query token t and earlier token s the index score is I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]): a few
heads j of small width, one key per token shared by all heads, per-token head weights w. MLA then attends only
over the `index_topk` keys with the highest scores, O(k L) instead of O(L^2). The indexer's RoPE rotates the
first `qk_rope_head_dim` values of each vector as two halves (not interleaved pairs, unlike MLA's).

The released model scores in FP8 after a Hadamard rotation of q and k; the rotation is orthogonal (dot products
unchanged), so this fp32 form is the same function up to the FP8 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DeepSeekV32Config
from .layers import Linear
from .rope import apply_rope


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

    def scores(self, x: Tensor, q_compressed: Tensor, cos: Tensor, sin: Tensor, keys: Tensor) -> Tensor:
        """Index scores I [B, T, key_len] in fp32 (eq. 1) of the T queries over `keys` [B, key_len, D].

        `q_compressed` is MLA's normalised compressed query c_q [B, T, q_lora_rank]."""
        batch, steps = x.shape[:2]
        q = self.wq_b(q_compressed).view(batch, steps, self.num_heads, self.head_dim)
        q = self._rope(q, cos[..., None, :], sin[..., None, :])
        logits = torch.einsum("bthd,bkd->bthk", q.float(), keys.float()) * self.head_dim ** -0.5
        weights = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.num_heads ** -0.5
        return torch.einsum("bth,bthk->btk", weights, F.relu(logits))

    def top_keys(self, scores: Tensor, visible: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(the k keys [B, T, k] of each query's highest scores among its `visible` ones (None: every key), in
        ascending order, so that a gather of them reads forward through memory; which of them are visible, as
        early queries see fewer than k). The one selection both the mask and the gathered attention use."""
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        chosen = scores.topk(self.topk, dim=-1, sorted=False).indices.sort(dim=-1).values
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
