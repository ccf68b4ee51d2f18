"""Block-FP8 checkpoints (DeepSeek-V3 `README_WEIGHTS.md`): 128x128 ceil-div blocks, dequantised on load."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek

E4M3_MAX = 448.0
# Partial blocks both ways: kv_a_proj_with_mqa has kv_lora_rank + qk_rope_head_dim = 128 + 64 = 192 rows and
# hidden_size = 320 columns, so its scale grid is [2, 3] with partial last row and column blocks (transformers
# 5.23 gets such blocks wrong).
FP8_CONFIG = dict(
    vocab_size=256, hidden_size=320, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=128, kv_lora_rank=128,
    qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, n_routed_experts=4, n_shared_experts=1,
    num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=0,
)
QUANTIZED = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
             "down_proj")


def quantize(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The natural quantiser: scale = amax(|block|) / 448 per zero-padded 128x128 block."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block), math.ceil(cols / block))
    padded = torch.zeros(grid[0] * block, grid[1] * block)
    padded[:rows, :cols] = weight
    blocks = padded.view(grid[0], block, grid[1], block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX
    expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return (weight / expanded).to(torch.float8_e4m3fn), scale


def write_fp8_checkpoint(path, model: nanoseek.CausalLM) -> dict[str, torch.Tensor]:
    """Save `model`, then quantise every decoder Linear as DeepSeek's release does; returns fp32 originals."""
    model.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    originals = {}
    for name in list(tensors):
        if name.startswith("model.layers.") and name.rsplit(".", 2)[-2] in QUANTIZED and name.endswith("weight"):
            originals[name] = tensors[name]
            tensors[name], tensors[name + "_scale_inv"] = quantize(tensors[name])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(config))
    return originals


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fp8")
    originals = write_fp8_checkpoint(path, nanoseek.CausalLM(nanoseek.ModelConfig(**FP8_CONFIG)))
    return path, originals


def test_partial_block_scale_grid(fp8_checkpoint):
    path, _ = fp8_checkpoint
    tensors = load_file(path / "model.safetensors")
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape == (192, 320)
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 3)


def test_fp8_weights_match_fp32_within_e4m3_rounding(fp8_checkpoint):
    path, originals = fp8_checkpoint
    model = nanoseek.load_model(path)
    assert model.config.quantization_config is None
    loaded = {name: slot.read() for name, slot in model.checkpoint_slots().items()}
    scales = load_file(path / "model.safetensors")
    for name, original in originals.items():
        scale = scales[name + "_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)
        scale = scale[: original.shape[0], : original.shape[1]]
        # e4m3: 3 mantissa bits -> relative error <= 2^-4; subnormals: absolute error <= 2^-10 * scale
        bound = original.abs() * 2**-4 + scale * 2**-10 + 1e-12
        assert ((loaded[name] - original).abs() <= bound).all(), name
        assert (loaded[name] - original).abs().max() > 0, "quantisation should not be lossless"


def test_fp8_checkpoint_logits_match_a_reference_dequantisation(fp8_checkpoint, tmp_path):
    """Dequantise independently, block by block, write a plain checkpoint; both must give the same logits."""
    path, originals = fp8_checkpoint
    tensors = load_file(path / "model.safetensors")
    for name in originals:
        weight, scale = tensors.pop(name).float(), tensors.pop(name + "_scale_inv")
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                weight[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= scale[i, j]
        tensors[name] = weight
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert (nanoseek.load_model(path)(ids) - nanoseek.load_model(tmp_path)(ids)).abs().max() <= 1e-6


def test_wrong_scale_grid_is_named(fp8_checkpoint, tmp_path):
    path, _ = fp8_checkpoint
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    tensors[name] = torch.ones(1, 2)  # floor-div grid instead of ceil-div
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(nanoseek.CheckpointError, match=rf"{name} has shape \[1, 2\], expected \[2, 3\]"):
        nanoseek.load_model(tmp_path)


def test_fp8_weight_without_scale_is_named(fp8_checkpoint, tmp_path):
    path, _ = fp8_checkpoint
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(nanoseek.CheckpointError, match="model.layers.1.self_attn.o_proj.weight is FP8 but "
                                                       "model.layers.1.self_attn.o_proj.weight_scale_inv is missing"):
        nanoseek.load_model(tmp_path)
