"""The pretraining objective and DeepSeek-V3's load balancing (V3 paper §2.1.2, §2.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import ModelOutput, MoE

IGNORE = -100


def token_loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy over the positions whose target is not IGNORE (fp32)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def mtp_loss(out: ModelOutput, targets: Tensor, denominator: Tensor) -> Tensor:
    """L_MTP = (1/D) sum_k L^k with L^k = -(1/T) sum log P^k (V3 eq. 24-25; the 1/T is the main loss's count).

    Depth k's entry i predicts the token i + k + 1, which is targets[i + k].
    """
    depths = len(out.mtp_logits)
    total = sum(token_loss_sum(logits, targets[:, k:]) for k, logits in enumerate(out.mtp_logits, start=1))
    return total / denominator / depths


def sequence_balance_loss(out: ModelOutput, batch: int, top_k: int) -> Tensor:
    """Complementary sequence-wise balance loss, summed over MoE layers (V3 eqs. 17-20), before alpha.

    f_i = N_r / (K T) * (tokens of the sequence routed to expert i), P_i = mean over the sequence of the
    normalised affinity s_i / sum_j s_j. Routed counts use the experts actually selected (with the bias); the
    paper's eq. 18 counts the unbiased top-K, a distinction it leaves open.
    """
    losses = []
    for stats in out.router_stats:
        scores = stats.scores.view(batch, -1, stats.scores.shape[-1])  # [B, T, E]
        experts, steps = scores.shape[-1], scores.shape[1]
        chosen = torch.zeros_like(scores).scatter_(2, stats.indices.view(batch, steps, -1), 1.0)
        f = chosen.sum(1) * experts / (top_k * steps)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)
        losses.append((f * p).sum(-1).mean())
    return torch.stack(losses).sum() if losses else out.logits.new_zeros(())


@torch.no_grad()
def update_router_biases(routers: list[MoE], counts: list[Tensor], gamma: float) -> None:
    """Auxiliary-loss-free balancing (V3 §2.1.2): b_i += gamma * sign(mean load - load_i) after each step.

    DeepSeek-V2's routers have no bias (V2 balances with auxiliary losses, V2 paper §2.2.3): they are skipped."""
    for router, load in zip(routers, counts, strict=True):
        if router.gate.e_score_correction_bias is None:
            continue
        load = load.float()
        router.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)


def max_violation(counts: list[Tensor]) -> list[float]:
    """MaxVio per layer: max load / mean load - 1 (V3 §4.5.2); 0 is perfect balance."""
    return [float(c.max() / c.float().mean() - 1) if c.sum() > 0 else 0.0 for c in counts]


def add_routed_counts(counts: list[Tensor], out: ModelOutput, real: Tensor | None) -> None:
    """Add each layer's tokens per expert to `counts`; with `real` [B, T], padding positions are left out."""
    for total, stats in zip(counts, out.router_stats, strict=False):
        if real is None:
            total += stats.counts
        else:
            rows, width = real.shape
            depth = width - stats.indices.shape[0] // rows  # MTP module k routes positions k.. of each row
            chosen = stats.indices[real[:, depth:].reshape(-1).to(stats.indices.device)]
            total += torch.bincount(chosen.reshape(-1), minlength=total.numel()).to(total.dtype)
