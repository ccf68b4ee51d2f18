"""The dense student family: Llama / Qwen2-style decoders (GQA, RoPE, SwiGLU, RMSNorm).

DeepSeek-R1's distilled models are this family (R1-Distill-Qwen-1.5B/7B/14B/32B are `Qwen2ForCausalLM`,
R1-Distill-Llama-8B/70B are `LlamaForCausalLM`; DeepSeek-R1 §2.4), so `DenseLM` uses their tensor names
(transformers' `modeling_llama.py`, `modeling_qwen2.py`). It is a `LanguageModel`, so one engine and one
training loop serve both families. The cache holds each token's keys and values (2 x kv heads x head_dim per
layer), in the same slot layout as the MLA latent cache.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DENSE_ARCHITECTURES, DENSE_PRESETS, DenseConfig
from ..hf_files import TensorSlot, param_slot
from .attention import CacheContext, LatentCache
from .base import LanguageModel, ModelOutput, module_slots
from .layers import MLP, Linear, RMSNorm, apply_keeping_dtype
from .rope import apply_rope

__all__ = ["DENSE_ARCHITECTURES", "DENSE_PRESETS", "DenseConfig", "DenseLM"]

def dense_inverse_frequencies(config: DenseConfig) -> Tensor:
    """RoPE inverse frequencies, with Llama 3's smooth long-context rescaling when the config asks for it:
    wavelengths above original_len / low_freq_factor are divided by `factor`, those below
    original_len / high_freq_factor kept, and the band between interpolated (Llama 3.1 report)."""
    dim = config.head_size
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq.float()
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    middle = (wavelength <= original / low) & (wavelength >= original / high)
    return torch.where(middle, blended, scaled).float()


class DenseRotary(nn.Module):
    def __init__(self, config: DenseConfig):
        super().__init__()
        self.register_buffer("inv_freq", dense_inverse_frequencies(config), persistent=False)

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtype(self, fn, recurse, ("inv_freq",))

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        return angles.cos().to(dtype), angles.sin().to(dtype)


class GroupedQueryAttention(nn.Module):
    """Causal attention with `num_key_value_heads` key/value heads shared by groups of query heads."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, \
            config.head_size
        bias = config.qkv_bias
        self.q_proj = Linear(config.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: CacheContext | None = None) -> Tensor:
        batch, steps, _ = x.shape
        q = self.q_proj(x).view(batch, steps, self.heads, self.head_dim)
        k = self.k_proj(x).view(batch, steps, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, steps, self.kv_heads, self.head_dim)
        q = apply_rope(q, cos[:, :, None], sin[:, :, None], interleaved=False)
        k = apply_rope(k, cos[:, :, None], sin[:, :, None], interleaved=False)
        mask = None
        if cache is not None:  # store this step's keys and values, attend over the slot's
            stored = cache.store(torch.cat((k, v), dim=-1).flatten(2))
            k, v = stored.view(batch, -1, self.kv_heads, 2 * self.head_dim).split(self.head_dim, dim=-1)
            mask = None if cache.mask is None else cache.mask[:, None]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        causal = cache is None and steps > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))


class DenseLayer(nn.Module):
    def __init__(self, config: DenseConfig):
        super().__init__()
        self.self_attn = GroupedQueryAttention(config)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, cache: CacheContext | None = None) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DenseModel(nn.Module):
    def __init__(self, config: DenseConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DenseLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DenseLM(LanguageModel):
    """A Llama / Qwen2 causal LM with the interface of `CausalLM` (no MTP, no routers)."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.config = config.validate()
        self.model = DenseModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.mtp = nn.ModuleList()
        self.rotary = DenseRotary(config)
        self.generation_config: dict = {}
        self.init_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def run(self, input_ids: Tensor, positions: Tensor | None = None, cache: LatentCache | None = None,
            slots: Tensor | None = None, *, mtp: bool = False, router_stats: bool = False,
            logits_index: Tensor | None = None, **_: Any) -> ModelOutput:
        """See `LanguageModel.run`; the MTP logits and router statistics are empty (the family has neither),
        and the execution options of other families (`absorbed`) do not apply."""
        batch, steps = input_ids.shape
        if positions is None:
            positions = torch.arange(steps, device=input_ids.device).expand(batch, steps)
        context = None if cache is None else CacheContext.build(cache, positions, slots)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        runners = self.layer_runners(steps, context is not None)
        for i, (layer, run_layer) in enumerate(zip(self.model.layers, runners, strict=True)):
            h = run_layer(layer, h, cos, sin, None if context is None else context.layer(i))
        hidden, logits = self.final(h, logits_index, context is not None)
        return ModelOutput(logits, hidden)

    def new_cache(self, num_slots: int, max_len: int, mtp: bool = False,
                  index_dtype: torch.dtype | None = None) -> LatentCache:
        """A key/value cache: per layer, slot and position the token's keys and values."""
        if mtp:
            raise ValueError("this dense model has no MTP module to draft with")
        if index_dtype is not None:
            raise ValueError(f"index_dtype = {index_dtype}: this dense model has no sparse-attention indexer")
        return LatentCache(self.config, self.config.num_hidden_layers, num_slots, max_len, self.device, self.dtype)

    def checkpoint_slots(self) -> dict[str, TensorSlot]:
        slots = module_slots("model.", self.model)
        head = self.lm_head.weight
        if self.config.tie_word_embeddings:  # one matrix, stored once as the embedding (transformers' rule)
            slots["lm_head.weight"] = TensorSlot(tuple(head.shape), lambda: head.detach(), lambda t: None,
                                                 optional=True, saved=False)
        else:
            slots["lm_head.weight"] = param_slot(head)
        return slots
