"""Logit parity with transformers' DeepseekV3ForCausalLM (fp32, eager) over a matrix of configs, with weights
exchanged through safetensors in both directions."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model, nanoseek_model

import nanoseek

TOL = 1e-4
NO_YARN = {"rope_scaling": None}

# Each case changes the tiny config (q_lora_rank 24, YaRN with original length 16,
# rope_interleave, first_k_dense_replace 1, 8 experts in 4 groups keeping 2, top-3).
MATRIX = {
    "base": {},
    "no-q-lora": {"q_lora_rank": None},
    "no-yarn": NO_YARN,
    "no-q-lora-no-yarn": {"q_lora_rank": None, **NO_YARN},
    "rope-half-split": {"rope_interleave": False},
    "all-moe": {"first_k_dense_replace": 0},
    "two-dense": {"first_k_dense_replace": 2},
    "one-group": {"n_group": 1, "topk_group": 1},
    "two-groups-keep-one": {"n_group": 2, "topk_group": 1},
    "16-experts-8-groups-keep-3": {"n_routed_experts": 16, "n_group": 8, "topk_group": 3, "num_experts_per_tok": 4},
    "no-topk-norm-scale-1": {"norm_topk_prob": False, "routed_scaling_factor": 1.0},
    "two-shared-experts": {"n_shared_experts": 2},
    "v2-lite-mscale": {"rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                                        "mscale": 0.707, "mscale_all_dim": 0.707,
                                        "original_max_position_embeddings": 16}},
    "attention-bias": {"attention_bias": True},
    "yarn-attention-factor-no-truncate": {"rope_scaling": {"type": "yarn", "factor": 8, "beta_fast": 16, "beta_slow": 2,
                                                           "attention_factor": 1.25, "truncate": False,
                                                           "mscale": 1.0, "mscale_all_dim": 1.0,
                                                           "original_max_position_embeddings": 16}},
}


def _ids(batch: int = 2, steps: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, steps), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(MATRIX))
def test_transformers_checkpoint_loads_with_equal_logits(case, tmp_path):
    hf = hf_model(**MATRIX[case])
    hf.save_pretrained(tmp_path)
    ours = nanoseek.load_model(tmp_path)
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        assert (ours(ids) - expected).abs().max() <= TOL
        assert (ours(ids, absorbed=True) - expected).abs().max() <= TOL


@pytest.mark.parametrize("shift", [-5.0, 2.0])
def test_negative_and_positive_correction_biases(shift, tmp_path):
    # All-negative biases are where masking dropped groups with 0 instead of -inf goes wrong
    # (deepseek-ai/DeepSeek-V3#741).
    hf = hf_model(bias_shift=shift)
    hf.save_pretrained(tmp_path)
    ours = nanoseek.load_model(tmp_path)
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= TOL


@pytest.mark.parametrize("case", ["base", "no-q-lora", "rope-half-split", "all-moe", "attention-bias"])
def test_nanoseek_checkpoint_loads_in_transformers(case, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    ours = nanoseek_model(**MATRIX[case])
    ours.save_pretrained(tmp_path)
    hf, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = _ids()
    with torch.no_grad():
        assert (hf.eval()(ids).logits - ours(ids)).abs().max() <= TOL


def test_yarn_matters_beyond_the_original_length(tmp_path):
    """Guard against a matrix that cannot see YaRN: scaled and unscaled logits differ far beyond TOL."""
    ids = _ids(steps=64)
    hf_model(**NO_YARN).save_pretrained(tmp_path / "plain")
    hf_model().save_pretrained(tmp_path / "yarn")
    with torch.no_grad():
        plain = nanoseek.load_model(tmp_path / "plain")(ids)
        yarn = nanoseek.load_model(tmp_path / "yarn")(ids)
    assert (plain - yarn).abs().max() > 10 * TOL


def test_bf16_weights_load_and_run(tmp_path):
    hf = hf_model().to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ours = nanoseek.load_model(tmp_path)  # fp32 on CPU
    assert ours.dtype == torch.float32
    reference = nanoseek.load_model(tmp_path, dtype=torch.bfloat16)
    assert reference.dtype == torch.bfloat16
    assert reference.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - hf.float()(ids).logits).abs().max() <= TOL


def test_bf16_model_keeps_fp32_rope_frequencies(tmp_path):
    hf_model().save_pretrained(tmp_path)
    fp32, bf16 = nanoseek.load_model(tmp_path), nanoseek.load_model(tmp_path, dtype=torch.bfloat16)
    assert bf16.rotary.inv_freq.dtype == torch.float32
    positions = torch.tensor([[600]])
    cos32, _ = fp32.rotary(positions, torch.float32)
    cos16, _ = bf16.rotary(positions, torch.bfloat16)
    assert (cos16.float() - cos32).abs().max() <= 2**-8  # only the final rounding to bf16
