"""The GRPO objective and its published variants, as switches (spec grpo-r1.md §1.2-1.3, §3.1-3.2).

* DeepSeekMath/R1 GRPO: group advantages (r - mean) / std, clipped ratio, k3 KL to a reference in the loss,
  each sequence's token mean, then the mean over sequences.
* Dr. GRPO: no std division, token sums over a constant (sequences x max completion length).
* DAPO: token-level mean over the batch, clip-higher (epsilon_high > epsilon_low), no KL; its dynamic sampling
  and overlong filtering act on the rollouts (see `zero_variance_groups` and the loss mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


@dataclass
class GRPOObjective:
    loss_type: str = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # DAPO: 0.28
    beta: float = 0.0  # k3 KL coefficient; 0 keeps no reference model
    scale_rewards: bool = True  # divide advantages by the group's std (Dr. GRPO: False)

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type = {self.loss_type!r}: one of {', '.join(LOSS_TYPES)}")
        if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0):
            raise ValueError(f"epsilon_low = {self.epsilon_low}, epsilon_high = {self.epsilon_high}: need "
                             "0 <= epsilon_low < 1 and epsilon_high >= 0")
        if self.beta < 0:
            raise ValueError(f"beta = {self.beta}: must be >= 0")

    def advantages(self, rewards: Tensor) -> Tensor:
        """rewards [prompts, G] -> advantages [prompts, G]: centred on the group mean, divided by the group's
        (Bessel) standard deviation unless Dr. GRPO's unscaled form is asked for."""
        if rewards.shape[-1] < 2:
            raise ValueError(f"group size G = {rewards.shape[-1]}: GRPO needs G >= 2 samples per prompt")
        centred = rewards - rewards.mean(dim=-1, keepdim=True)
        if not self.scale_rewards:
            return centred
        return centred / (rewards.std(dim=-1, keepdim=True) + 1e-4)

    def loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, max_length: int | None = None,
             ref_logp: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """Policy loss over completions: logp/old_logp/ref_logp/mask [N, T] (token log-probs of the sampled
        tokens under the current, rollout and reference policies), advantages [N]."""
        mask = mask.to(logp.dtype)
        ratio = torch.exp(logp - old_logp)
        clipped = ratio.clamp(1 - self.epsilon_low, 1 + self.epsilon_high)
        advantage = advantages[:, None]
        per_token = -torch.minimum(ratio * advantage, clipped * advantage)
        kl = None
        if self.beta:
            if ref_logp is None:
                raise ValueError("beta > 0 needs the reference model's log-probs")
            delta = ref_logp - logp
            kl = torch.exp(delta) - delta - 1  # k3: unbiased, >= 0 (spec §1.3)
            per_token = per_token + self.beta * kl
        lengths = mask.sum(dim=-1)
        if self.loss_type == "grpo":
            loss = ((per_token * mask).sum(dim=-1) / lengths.clamp_min(1)).mean()
        elif self.loss_type == "dapo":
            loss = (per_token * mask).sum() / mask.sum().clamp_min(1)
        else:
            loss = (per_token * mask).sum() / (logp.shape[0] * (max_length or logp.shape[1]))
        tokens, live = mask.sum().clamp_min(1), mask.bool()
        with torch.no_grad():  # the share of tokens whose ratio the clip holds at a bound
            stats = {
                "clip_low": float(((ratio < 1 - self.epsilon_low) & (advantage < 0) & live).sum() / tokens),
                "clip_high": float(((ratio > 1 + self.epsilon_high) & (advantage > 0) & live).sum() / tokens),
                "kl": float((kl * mask).sum() / tokens) if kl is not None else 0.0,
            }
        return loss, stats


def zero_variance_groups(rewards: Tensor) -> Tensor:
    """[prompts] bool: groups whose G rewards are all equal, which carry no signal (DAPO drops them)."""
    return (rewards == rewards[:, :1]).all(dim=-1)
