"""The GRPO objective against closed forms (spec grpo-r1.md §1.3, §3.1)."""

from __future__ import annotations

import pytest
import torch

from nanoseek.train.grpo import GRPOObjective, zero_variance_groups


def completions(lengths: list[int], width: int = 512, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(len(lengths), width, generator=gen) * 3).requires_grad_()
    mask = torch.zeros(len(lengths), width)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return logp, mask


def test_advantages_match_the_worked_examples():
    grpo, dr = GRPOObjective(), GRPOObjective(loss_type="dr_grpo", scale_rewards=False)
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(grpo.advantages(rewards), torch.tensor([[1.5, -0.5, -0.5, -0.5]]), atol=1e-3)
    assert torch.allclose(dr.advantages(rewards), torch.tensor([[0.75, -0.25, -0.25, -0.25]]))
    assert torch.allclose(grpo.advantages(torch.tensor([[1.0, 1, 1, 0]])), torch.tensor([[0.5, 0.5, 0.5, -1.5]]),
                          atol=1e-3)
    assert torch.allclose(grpo.advantages(torch.tensor([[1.0, 0, 1, 0]])).abs(), torch.full((1, 4), 0.866),
                          atol=1e-3)
    with pytest.raises(ValueError, match="G = 1: GRPO needs G >= 2"):
        grpo.advantages(torch.ones(3, 1))


@pytest.mark.parametrize(("loss_type", "expected"), [
    ("grpo", [0.00375, -0.00250, -0.00062, -0.00031]),
    ("dapo", [0.00200, -0.00067, -0.00067, -0.00067]),
    ("dr_grpo", [0.00073, -0.00024, -0.00024, -0.00024]),
])
def test_per_token_gradient_weights_of_each_aggregation(loss_type, expected):
    """Spec §3.1's table: G = 4, rewards [1, 0, 0, 0], lengths [100, 50, 200, 400], L = 512."""
    objective = GRPOObjective(loss_type=loss_type)
    logp, mask = completions([100, 50, 200, 400])
    advantages = objective.advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))[0]
    loss, _ = objective.loss(logp, logp.detach(), advantages, mask, max_length=512)
    loss.backward()
    weights = [-logp.grad[i, 0].item() for i in range(4)]  # the weight on each sequence's d log p
    assert weights == pytest.approx(expected, abs=6e-6)
    assert (logp.grad * (1 - mask)).abs().max() == 0  # padding gets no gradient


def test_on_policy_gradient_is_reinforce_with_the_group_baseline():
    objective = GRPOObjective()
    rewards = torch.tensor([[0.2, 1.0, 0.0, 0.7], [1.0, 1.0, 0.0, 0.0]])
    advantages = objective.advantages(rewards).flatten()
    lengths = [30, 7, 50, 12, 40, 40, 3, 9]
    logp, mask = completions(lengths, width=64, seed=1)
    loss, stats = objective.loss(logp, logp.detach(), advantages, mask)
    loss.backward()
    reinforce = -advantages[:, None] * mask / (len(lengths) * torch.tensor(lengths, dtype=torch.float)[:, None])
    assert torch.allclose(logp.grad, reinforce, atol=1e-7)
    assert stats["clip_low"] == stats["clip_high"] == 0.0  # ratio 1 on policy


def test_k3_kl_gradient():
    """d/dlogp of beta * k3 = beta * (1 - pi_ref / pi) per token (spec §1.3); with zero advantage it is all."""
    objective = GRPOObjective(beta=0.04)
    logp, mask = completions([10, 20], width=20, seed=2)
    ref = logp.detach() + torch.randn(2, 20, generator=torch.Generator().manual_seed(3)) * 0.3
    loss, stats = objective.loss(logp, logp.detach(), torch.zeros(2), mask, ref_logp=ref)
    loss.backward()
    lengths = mask.sum(1, keepdim=True)
    expected = 0.04 * (1 - torch.exp(ref - logp.detach())) * mask / (2 * lengths)
    assert torch.allclose(logp.grad, expected, atol=1e-7)
    assert stats["kl"] > 0


def test_clipping_stops_the_gradient_past_the_bounds():
    objective = GRPOObjective(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28)
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[0.7, 0.9, 1.2, 1.4]])).requires_grad_()  # ratios 0.7 .. 1.4
    loss, stats = objective.loss(logp, old, torch.tensor([1.0]), torch.ones(1, 4))
    loss.backward()
    assert logp.grad[0, 3] == 0 and logp.grad[0, 0] != 0  # above 1 + eps_high with A > 0: clipped
    assert stats["clip_high"] == 0.25
    with pytest.raises(ValueError, match="loss_type = 'ppo'"):
        GRPOObjective(loss_type="ppo")
    assert zero_variance_groups(torch.tensor([[1.0, 1.0], [0.0, 1.0]])).tolist() == [True, False]
