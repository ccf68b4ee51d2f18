"""The dense student family: Llama / Qwen2-style decoders (GQA, RoPE, SwiGLU, RMSNorm).

DeepSeek-R1's distilled models are this family (R1-Distill-Qwen-1.5B/7B/14B/32B are `Qwen2ForCausalLM`,
R1-Distill-Llama-8B/70B are `LlamaForCausalLM`; DeepSeek-R1 §2.4 and the models' config.json), so
`DenseConfig` reads and writes those config.json files and `DenseLM` uses their tensor names. It offers
the interface the engine and the training loop use (`run`, `new_cache`, `save_pretrained`, ...), so one engine
and one loop serve both families. The cache holds each token's keys and values (2 x kv heads x head_dim per
layer), in the same slot layout as the MLA latent cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from .attention import CacheContext, LatentCache
from .layers import MLP, RMSNorm, apply_keeping_fp32
from .rope import apply_rope
from .transformer import LanguageModel, ModelOutput, _select

DENSE_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Students for the built-in pipeline, in R1-Distill-Qwen's layout (the vocabulary comes from the teacher).
DENSE_PRESETS = {
    "nano-dense": dict(model_type="qwen2", hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=True, rope_theta=10000.0),
}
_IGNORED_KEYS = frozenset({"architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
                           "model_type", "use_cache", "pretraining_tp", "auto_map", "use_sliding_window",
                           "sliding_window", "max_window_layers", "layer_types", "mlp_bias", "rope_parameters"})


@dataclass
class DenseConfig:
    model_type: str = "qwen2"  # "llama" or "qwen2": Qwen2 has biases on q, k and v
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int | None = None  # default hidden_size / num_attention_heads
    max_position_embeddings: int = 131072
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None, or Llama 3's {"rope_type": "llama3", ...}
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False  # Llama's switch for q/k/v/o biases; Qwen2 always has q/k/v biases, never o
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def kv_cache_dim(self) -> int:
        """Cache width per token and layer: keys then values of every kv head."""
        return 2 * self.num_key_value_heads * self.head_size

    num_nextn_predict_layers = 0  # no MTP in this family

    def validate(self) -> DenseConfig:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"config field `{name}` = {getattr(self, name)!r}: {rule}")

        need(self.model_type in DENSE_ARCHITECTURES, "model_type", f"one of {', '.join(DENSE_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, name, "must be a positive integer")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"must divide num_attention_heads = {self.num_attention_heads}")
        need(self.head_size % 2 == 0, "head_dim", "must be even (RoPE rotates pairs)")
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' (SwiGLU) is supported")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        need(rope_type in ("default", "llama3"), "rope_scaling", "only no scaling or Llama 3's 'llama3' is supported")
        return self

    # ---- JSON ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DenseConfig:
        raw = dict(raw)
        if raw.get("model_type") not in DENSE_ARCHITECTURES:
            raise ConfigError(f"config field `model_type` = {raw.get('model_type')!r}: not a dense family model")
        parameters = raw.get("rope_parameters")  # transformers 5.x form
        if isinstance(parameters, dict) and "rope_theta" not in raw:
            raw["rope_theta"] = parameters.get("rope_theta", 10000.0)
            if parameters.get("rope_type", "default") != "default" and raw.get("rope_scaling") is None:
                raw["rope_scaling"] = {k: v for k, v in parameters.items() if k != "rope_theta"}
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known and k not in _IGNORED_KEYS}
        if kwargs.get("rope_scaling") is not None and kwargs["rope_scaling"].get("rope_type", "default") == "default" \
                and kwargs["rope_scaling"].get("type") is None:
            kwargs["rope_scaling"] = None
        return cls(**kwargs, extra=extra).validate()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": [DENSE_ARCHITECTURES[self.model_type]]}
        for f in dataclasses.fields(self):
            if f.name != "extra" and not (f.name == "head_dim" and self.head_dim is None):
                out[f.name] = getattr(self, f.name)
        out.update(self.extra)
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> DenseConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_json_file(self, path: str | Path, dtype: str | None = None) -> None:
        data = self.to_dict()
        if dtype is not None:
            data["torch_dtype"] = dtype
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> DenseConfig:
        return dataclasses.replace(self, **changes).validate()


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
        return apply_keeping_fp32(self, fn, recurse, ("inv_freq",))

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        return angles.cos().to(dtype), angles.sin().to(dtype)


class GroupedQueryAttention(nn.Module):
    """Causal attention with `num_key_value_heads` key/value heads shared by groups of query heads."""

    def __init__(self, config: DenseConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, \
            config.head_size
        bias = config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: CacheContext | None = None) -> Tensor:
        batch, steps, _ = x.shape
        q = self.q_proj(x).view(batch, steps, self.heads, self.head_dim)
        k = self.k_proj(x).view(batch, steps, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, steps, self.kv_heads, self.head_dim)
        q = apply_rope(q, cos[:, :, None], sin[:, :, None], interleaved=False)
        k = apply_rope(k, cos[:, :, None], sin[:, :, None], interleaved=False)
        mask = None
        if cache is not None:  # store this step's keys and values, attend over the slot's
            stored = cache.store(self.layer_idx, torch.cat((k, v), dim=-1).flatten(2))
            k, v = stored.view(batch, -1, self.kv_heads, 2 * self.head_dim).split(self.head_dim, dim=-1)
            mask = None if cache.mask is None else cache.mask[:, None]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        causal = cache is None and steps > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))


class DenseLayer(nn.Module):
    def __init__(self, config: DenseConfig, layer_idx: int):
        super().__init__()
        self.self_attn = GroupedQueryAttention(config, layer_idx)
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
        self.layers = nn.ModuleList(DenseLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DenseLM(LanguageModel):
    """A Llama / Qwen2 causal LM with the interface of `CausalLM` (no MTP, no routers)."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.config = config.validate()
        self.model = DenseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = nn.ModuleList()
        self.rotary = DenseRotary(config)
        self.generation_config: dict = {}
        self.init_weights()

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, cache: LatentCache | None = None,
                slots: Tensor | None = None, *, mtp: bool = False, router_stats: bool = False,
                logits_index: Tensor | None = None, **_: Any) -> Tensor | ModelOutput:
        out = self.run(input_ids, positions, cache, slots, mtp=mtp, logits_index=logits_index)
        return out if (mtp or router_stats) else out.logits

    def run(self, input_ids: Tensor, positions: Tensor | None = None, cache: LatentCache | None = None,
            slots: Tensor | None = None, *, mtp: bool = False, logits_index: Tensor | None = None,
            **_: Any) -> ModelOutput:
        batch, steps = input_ids.shape
        if positions is None:
            positions = torch.arange(steps, device=input_ids.device).expand(batch, steps)
        context = None if cache is None else CacheContext.build(cache, positions, slots)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, context)
        hidden = self.model.norm(h)
        out = ModelOutput(self.lm_head(_select(hidden, logits_index)), hidden, router_stats=[])
        if mtp:
            out.mtp_logits = []
        return out

    def new_cache(self, num_slots: int, max_len: int, mtp: bool = False) -> LatentCache:
        """A key/value cache: per layer, slot and position the token's keys and values."""
        if mtp:
            raise ValueError("this dense model has no MTP module to draft with")
        return LatentCache(self.config, self.config.num_hidden_layers, num_slots, max_len, self.device, self.dtype)
