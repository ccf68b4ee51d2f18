"""DeepSeekMoE (V3 paper §2.1.2, eqs. 12-16; V2 paper §2.2): a router -- DeepSeek-V3's sigmoid scores with
group-limited, bias-corrected top-k, or DeepSeek-V2's softmax scores with plain or device-limited top-k --
fine-grained routed experts computed per expert over its own tokens, and always-on shared experts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..hf_files import TensorSlot
from .layers import MLP, apply_keeping_dtype, linear


@dataclass
class RouterStats:
    """What one MoE layer's router did in a forward pass; the trainer's balancing needs these."""

    scores: Tensor  # [N, E] affinities s_{i,t}, sigmoid (V3) or softmax (V2) (fp32, unbiased, differentiable)
    indices: Tensor  # [N, K] selected experts (in V3, selection used the bias)
    counts: Tensor  # [E] tokens routed to each expert


class Router(nn.Module):
    """`mlp.gate`: weight [E, d] and, for DeepSeek-V3's `noaux_tc` routing, the e_score_correction_bias buffer
    (fp32, never trained by gradient). DeepSeek-V2's routers have no bias: the buffer is None and is neither
    stored nor loaded."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.num_groups, self.topk_groups = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.group_limited = config.topk_method == "group_limited_greedy"  # V2 only
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        bias = torch.zeros(config.n_routed_experts) if config.correction_bias else None
        self.register_buffer("e_score_correction_bias", bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [N, d] -> (weights [N, K] fp32, indices [N, K], scores [N, E] fp32)."""
        logits = linear(x.float(), self.weight.float())  # router in fp32, as transformers
        if self.e_score_correction_bias is None:
            return self._softmax_top_k(logits.softmax(dim=-1))
        scores = logits.sigmoid()
        biased = scores.detach() + self.e_score_correction_bias  # the bias steers selection only (V3 eq. 16)
        grouped = biased.view(x.shape[0], self.num_groups, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # a group's score: its top-2 experts
        keep = group_scores.topk(self.topk_groups, dim=-1).indices
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        # -inf, not 0: a 0 would beat selected experts whose biased score is negative
        # (deepseek-ai/DeepSeek-V3#741)
        biased = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
        indices = biased.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)  # gating values come from the unbiased scores (V3 eq. 16)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, indices, scores

    def _softmax_top_k(self, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """DeepSeek-V2's selection (V2 paper §2.2.1-2.2.2; transformers' `DeepseekV2TopkRouter`): the K highest
        softmax affinities -- with `group_limited_greedy`, only from the topk_group groups (devices) whose best
        expert scores highest. The gates are the affinities times routed_scaling_factor, never renormalised
        (the config rejects norm_topk_prob for V2)."""
        candidates = scores
        if self.group_limited:
            grouped = scores.view(scores.shape[0], self.num_groups, -1)
            keep = grouped.amax(dim=-1).topk(self.topk_groups, dim=-1).indices  # a group's score: its best expert
            dropped = torch.ones(grouped.shape[:2], dtype=torch.bool, device=scores.device).scatter_(1, keep, False)
            candidates = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
        indices = candidates.topk(self.top_k, dim=-1).indices
        return scores.gather(1, indices) * self.scaling, indices, scores

    def _apply(self, fn, recurse=True):
        if self.e_score_correction_bias is None:
            return super()._apply(fn, recurse)
        # fp32 as in transformers: bias updates of gamma = 0.001 would vanish in bf16
        return apply_keeping_dtype(self, fn, recurse, ("e_score_correction_bias",))


def _grouped_mm_supported(x: Tensor, weights: Tensor) -> bool:
    """torch's grouped GEMM runs on CPU (eager: any float; compiled: bf16) and on CUDA in bf16 (SM >= 80), with
    rows aligned to 16 bytes."""
    if not hasattr(F, "grouped_mm") or (x.shape[-1] * x.element_size()) % 16 or \
            (weights.shape[-1] * weights.element_size()) % 16:
        return False
    if x.device.type == "cpu":  # compiled, its meta function takes bf16 only (torch 2.13)
        return x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and \
        torch.cuda.get_device_capability(x.device)[0] >= 8


def grouped_matmul(x: Tensor, weights: Tensor, counts: Tensor) -> Tensor:
    """Rows of x sorted by expert, `counts[e]` of them for expert e: returns x_e @ weights[e] for each group."""
    if _grouped_mm_supported(x, weights):
        return F.grouped_mm(x, weights, offs=counts.cumsum(0).to(torch.int32))
    return _loop_matmul(x, weights, counts)


def _loop_matmul(x: Tensor, weights: Tensor, counts: Tensor) -> Tensor:
    outs, start = [], 0
    for expert, count in enumerate(counts.tolist()):  # a loop over experts, never over tokens
        if count:
            outs.append(x[start: start + count] @ weights[expert])
            start += count
    return torch.cat(outs) if outs else x.new_zeros(0, weights.shape[-1])


def _cpu_strategy(rows: int, experts: int) -> str:
    """How to run `rows` (token, expert) pairs on CPU, where small GEMMs are slow and their speed uneven.

    Few rows (decoding a few sequences): a loop over the experts actually used. A few rows per expert (batched
    decode): one padded batched GEMM over all experts, which streams their weights fastest. Many rows
    (prefill, training): grouped GEMM.
    """
    if rows < experts:
        return "loop"
    return "padded" if rows < 4 * experts else "grouped"


# Compiled, up to this many (token, expert) pairs per expert run as `gathered_experts`: reading a chosen
# expert once per token costs at most twice the bytes of all experts. `small` at 16 sequences (64 pairs of 32
# experts): 349-368 tok/s against 214 with the sorted path, which breaks the compiled graph (docs/benchmarks.md).
GATHERED_PAIRS = 2

ExpertOutputs = Callable[[Tensor, Tensor, Tensor], Tensor]


def route_to_experts(x: Tensor, indices: Tensor, weights: Tensor, experts: int,
                     expert_outputs: ExpertOutputs) -> tuple[Tensor, Tensor]:
    """Sort the (token, expert) pairs by expert, let `expert_outputs(rows, expert_of_row, counts)` run each
    expert over its rows, and sum each token's K outputs weighted by its gates: (y [N, d], counts [E])."""
    top_k = indices.shape[1]
    flat = indices.flatten()
    order = flat.argsort(stable=True)  # group the (token, expert) pairs by expert
    token = order // top_k
    counts = torch.bincount(flat, minlength=experts)
    # index_select, not x[token]: indexing's backward sums each token's K gradient rows with
    # index_put_(accumulate=True), which on CPU adds atomically across threads, in no fixed order, from 32,768
    # elements on (training runs differed by 1e-7); index_select's backward, index_add_, sums in index order.
    rows = x.index_select(0, token)
    out = expert_outputs(rows, flat[order], counts) * weights.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype)), counts


def gathers(x: Tensor, indices: Tensor, experts: int) -> bool:
    """Whether the routed experts run as `gathered_experts`: compiled for the CPU, with few (token, expert)
    pairs per expert."""
    return torch.compiler.is_compiling() and x.device.type == "cpu" and indices.numel() <= GATHERED_PAIRS * experts


ExpertMap = Callable[[Tensor, Tensor], Tensor]  # (h [N, K or 1, in], indices [N, K]) -> [N, K, out]


def gathered_experts(x: Tensor, indices: Tensor, weights: Tensor, experts: int, gate_up: ExpertMap,
                     down: ExpertMap) -> tuple[Tensor, Tensor]:
    """Few tokens, compiled (`LanguageModel.compile_decode`): each token's K experts as row reductions over the
    selected experts' matrices, indexed in place (inductor loads `w[indices]` inside the reduction; no copy, no
    sort, no per-expert loop, no graph break). `gate_up` maps x [N, 1, d] to [N, K, 2I] and `down` [N, K, I]
    to [N, K, d], each with the matrices of `indices`. An expert chosen by several tokens is read once per token,
    hence the limit `GATHERED_PAIRS`; fast when the reduced dimension is the contiguous one in memory."""
    gate, up = gate_up(x[:, None, :], indices).chunk(2, dim=-1)
    out = down(F.silu(gate) * up, indices)
    y = (out.float() * weights[..., None]).sum(1)  # gates in fp32, as `route_to_experts` applies them
    flat = indices.flatten()
    counts = torch.zeros(experts, dtype=torch.long, device=x.device).index_add_(0, flat, torch.ones_like(flat))
    return y.to(x.dtype), counts


class RoutedExperts(nn.Module):
    """All routed experts' SwiGLU weights, stacked for grouped matmuls.

    `w_gate_up` [E, d, 2I] holds each expert's gate then up projection as right-multiplied matrices;
    `w_down` [E, I, d]. The checkpoint stores them per expert as `experts.{e}.{gate,up,down}_proj.weight`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        experts, d, inner = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.w_gate_up = nn.Parameter(torch.empty(experts, d, 2 * inner))
        self.w_down = nn.Parameter(torch.empty(experts, inner, d))

    def forward(self, x: Tensor, indices: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, d], indices/weights [N, K] -> (sum_k weights * expert_k(x) [N, d], counts [E])."""
        experts = self.w_gate_up.shape[0]
        if gathers(x, indices, experts):
            return gathered_experts(x, indices, weights, experts, self._gate_up_rows, self._down_rows)
        return route_to_experts(x, indices, weights, experts, self._expert_outputs)

    def _gate_up_rows(self, h: Tensor, indices: Tensor) -> Tensor:
        return (h[..., None] * self.w_gate_up[indices]).sum(-2)

    def _down_rows(self, h: Tensor, indices: Tensor) -> Tensor:
        return (h[..., None] * self.w_down[indices]).sum(-2)

    def reduce_over_contiguous(self) -> None:
        """Store each expert's matrices [out, in] (nn.Linear's layout) behind the same [E, in, out] shapes, so
        that the gathered reductions read contiguous rows; the GEMM paths take either layout."""
        for param in (self.w_gate_up, self.w_down):
            param.data = param.data.transpose(1, 2).contiguous().transpose(1, 2)

    def _expert_outputs(self, rows: Tensor, expert_of_row: Tensor, counts: Tensor) -> Tensor:
        strategy = _cpu_strategy(rows.shape[0], counts.shape[0]) if rows.device.type == "cpu" else "grouped"
        if strategy == "padded":
            return self._padded(rows, expert_of_row, counts)
        matmul = _loop_matmul if strategy == "loop" else grouped_matmul
        gate, up = matmul(rows, self.w_gate_up, counts).chunk(2, dim=-1)
        return matmul(F.silu(gate) * up, self.w_down, counts)

    def _padded(self, rows: Tensor, expert_of_row: Tensor, counts: Tensor) -> Tensor:
        """Every expert over its rows padded to the largest group: two batched GEMMs, no per-expert loop."""
        starts = counts.cumsum(0) - counts
        within = torch.arange(rows.shape[0], device=rows.device) - starts[expert_of_row]
        padded = rows.new_zeros(counts.shape[0], int(counts.max()), rows.shape[1])
        padded[expert_of_row, within] = rows
        gate, up = torch.bmm(padded, self.w_gate_up).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.w_down)[expert_of_row, within]

    def checkpoint_slots(self, prefix: str) -> dict[str, TensorSlot]:
        """Per-expert checkpoint matrices (`{prefix}{e}.gate_proj.weight`, ... in nn.Linear's [out, in] layout)
        as views of the stacked right-multiplied ones."""
        inner = self.w_down.shape[1]
        slots = {}
        for e in range(self.w_gate_up.shape[0]):
            views = {"gate_proj": self.w_gate_up[e, :, :inner], "up_proj": self.w_gate_up[e, :, inner:],
                     "down_proj": self.w_down[e]}
            for name, view in views.items():
                slots[f"{prefix}{e}.{name}.weight"] = TensorSlot(
                    tuple(view.T.shape), lambda v=view: v.detach().T, lambda t, v=view: v.data.copy_(t.T))
        return slots


class MoE(nn.Module):
    """y = sum of the K selected routed experts, weighted, + the shared experts (V3 paper eq. 12; no token dropping)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        shared = config.n_shared_experts * config.moe_intermediate_size
        self.shared_experts = MLP(config.hidden_size, shared) if shared else None

    def forward(self, x: Tensor, stats: list[RouterStats] | None = None) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, indices, scores = self.gate(flat)
        y, counts = self.experts(flat, indices, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if stats is not None:
            stats.append(RouterStats(scores, indices, counts))
        return y.view_as(x)
