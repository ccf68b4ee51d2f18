"""Rotary position embedding with YaRN, as transformers computes it (`modeling_rope_utils.py`,
`_compute_yarn_parameters`; YaRN, arXiv 2309.00071).

RoPE acts only on the decoupled `qk_rope_head_dim` parts of queries and keys. YaRN changes three things:
the inverse frequencies (a ramp between interpolation and extrapolation), a multiplier on cos/sin
(`attention_factor`, transformers only) and the softmax scale (`mscale_all_dim`, see `softmax_scale`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import ModelConfig, yarn_mscale
from .layers import apply_keeping_dtype


def inverse_frequencies(config: ModelConfig) -> tuple[Tensor, float]:
    """Return (inv_freq [d_r/2] fp32, cos/sin multiplier) for the config's RoPE (YaRN §3)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq.float(), 1.0
    scale, original = float(rs["factor"]), float(rs["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rs.get("beta_fast") or 32), float(rs.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1 = extrapolate (keep the frequency), 0 = interpolate (divide by the scale)
    inv_freq = inv_freq * keep + inv_freq / scale * (1.0 - keep)
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        factor = float(rs["attention_factor"])
    elif mscale and mscale_all_dim:
        factor = yarn_mscale(scale, mscale) / yarn_mscale(scale, mscale_all_dim)
    else:
        factor = yarn_mscale(scale, 1.0)  # transformers' default when the pair is absent (`_compute_yarn_parameters`)
    return inv_freq.float(), factor


def softmax_scale(config: ModelConfig) -> float:
    """d_qk^-1/2, times yarn_mscale(factor, mscale_all_dim)^2 when YaRN sets mscale_all_dim
    (DeepSeek-V3 `inference/model.py`, `MLA.__init__`)."""
    scale = config.qk_head_dim**-0.5
    rs = config.rope_scaling
    if rs is not None and rs.get("mscale_all_dim"):
        scale *= yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"])) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions; applied by `apply_rope` to the rope parts of q and k."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtype(self, fn, recurse, ("inv_freq",))  # angles p * f need fp32 at long contexts

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [..., T] (int) -> cos, sin [..., T, d_r/2] in `dtype`."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate x [..., T, (heads,) d_r] by the angles behind cos/sin [..., T, d_r/2].

    `interleaved=True` treats (x[2i], x[2i+1]) as the pairs, as DeepSeek's released weights are laid out;
    `False` pairs x[i] with x[i + d_r/2] (the rotate-half convention). Either way the rotated pairs are
    returned as [first elements, second elements], which is transformers' layout
    (`apply_rotary_pos_emb_interleave`): q and k get the same permutation, so attention scores are those of
    the official interleaved rotation.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
