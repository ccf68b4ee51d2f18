"""DeepSeekMoE pieces that parity alone does not pin down: grouped expert compute, router statistics,
the fp32 correction bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import nanoseek_model

from nanoseek.model import moe as moe_module
from nanoseek.model.moe import MoE, grouped_matmul


def test_grouped_matmul_equals_per_expert_products():
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    x, w = torch.randn(16, 12, generator=gen), torch.randn(6, 12, 4, generator=gen)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)[:-1]])
    expected = torch.cat([x[s:s + c] @ w[e] for e, (s, c) in enumerate(zip(starts, counts, strict=True))])
    assert torch.allclose(grouped_matmul(x, w, counts), expected, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_expert_strategies_agree(monkeypatch, tokens):
    layer = nanoseek_model().model.layers[1].mlp
    x = torch.randn(tokens, 64)
    results = {}
    with torch.no_grad():
        for strategy in ("loop", "padded", "grouped"):
            monkeypatch.setattr(moe_module, "_cpu_strategy", lambda rows, experts, s=strategy: s)
            results[strategy] = layer(x)
    assert torch.allclose(results["loop"], results["padded"], atol=1e-5)
    assert torch.allclose(results["loop"], results["grouped"], atol=1e-5)


def test_moe_equals_a_dense_reference_of_the_selected_experts():
    layer = nanoseek_model().model.layers[1].mlp
    x = torch.randn(11, 64)
    with torch.no_grad():
        weights, indices, _ = layer.gate(x)
        inner = layer.experts.w_down.shape[1]
        expected = layer.shared_experts(x)
        for t in range(x.shape[0]):
            for w, e in zip(weights[t], indices[t], strict=True):
                gate, up = (x[t] @ layer.experts.w_gate_up[e]).split(inner)
                expected[t] += w * (F.silu(gate) * up) @ layer.experts.w_down[e]
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_router_statistics_and_gradients():
    model = nanoseek_model(first_k_dense_replace=0)
    ids = torch.randint(0, 128, (2, 10))
    out = model(ids, router_stats=True)
    assert len(out.router_stats) == 3
    for stats in out.router_stats:
        assert stats.scores.shape == (20, 8) and stats.indices.shape == (20, 3)
        assert int(stats.counts.sum()) == 20 * 3
        assert torch.equal(stats.counts, torch.bincount(stats.indices.flatten(), minlength=8))
    out.logits.sum().backward()
    layer = model.model.layers[0].mlp
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0
    assert layer.experts.w_gate_up.grad.abs().sum() > 0


def test_bias_steers_selection_only():
    layer = nanoseek_model().model.layers[1].mlp
    x = torch.randn(5, 64)
    with torch.no_grad():
        layer.gate.e_score_correction_bias.zero_()
        layer.gate.e_score_correction_bias[0] = 100.0  # expert 0 always selected...
        weights, indices, scores = layer.gate(x)
    assert (indices == 0).any(dim=1).all()
    picked = scores.gather(1, indices)  # ...with its gate value from the unbiased score
    assert torch.allclose(weights, 2.5 * picked / picked.sum(1, keepdim=True))


def test_correction_bias_stays_fp32_in_bf16_models():
    model = nanoseek_model().to(torch.bfloat16)
    moe = [m for m in model.modules() if isinstance(m, MoE)]
    assert moe and all(m.gate.e_score_correction_bias.dtype == torch.float32 for m in moe)
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.bfloat16
