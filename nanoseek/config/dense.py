"""DenseConfig: the config.json of the dense student family, Llama and Qwen2 (transformers'
`configuration_llama.py` and `configuration_qwen2.py`: field names, meanings and defaults).

DeepSeek-R1's distilled models are this family (R1-Distill-Qwen-1.5B/7B/14B/32B are `Qwen2ForCausalLM`,
R1-Distill-Llama-8B/70B are `LlamaForCausalLM`; DeepSeek-R1 §2.4 and the models' config.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .base import COMMON_IGNORED_KEYS, HFConfig

DENSE_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Students for the built-in pipeline, in R1-Distill-Qwen's layout (the vocabulary comes from the teacher).
DENSE_PRESETS = {
    "nano-dense": dict(model_type="qwen2", hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=True, rope_theta=10000.0),
}


@dataclass
class DenseConfig(HFConfig):
    MODEL_TYPES: ClassVar[tuple[str, ...]] = tuple(DENSE_ARCHITECTURES)
    IGNORED_KEYS: ClassVar[frozenset[str]] = COMMON_IGNORED_KEYS | {
        "pretraining_tp", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "mlp_bias",
        "rope_parameters"}
    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ("head_dim",)

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

    num_nextn_predict_layers: ClassVar[int] = 0  # no MTP in this family

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

    @property
    def index_cache_dim(self) -> int:
        """No sparse-attention indexer keys: the dense family attends densely."""
        return 0

    @property
    def architecture(self) -> str:
        return DENSE_ARCHITECTURES[self.model_type]

    def validate(self) -> DenseConfig:
        need = self.need
        need(self.model_type in DENSE_ARCHITECTURES, "model_type", f"one of {', '.join(DENSE_ARCHITECTURES)}")
        self.need_positive_ints(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings"))
        self.need_bools(("attention_bias", "tie_word_embeddings"))
        self.need_numbers(("rope_theta", "rms_norm_eps", "initializer_range"))
        need(self.head_dim is None or (isinstance(self.head_dim, int) and self.head_dim > 0), "head_dim",
             "must be a positive integer or null (hidden_size / num_attention_heads)")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"must divide num_attention_heads = {self.num_attention_heads}")
        need(self.head_size % 2 == 0, "head_dim", "must be even (RoPE rotates pairs)")
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' (SwiGLU) is supported")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.rope_scaling is None or isinstance(self.rope_scaling, dict), "rope_scaling",
             "must be an object or null")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        need(rope_type in ("default", "llama3"), "rope_scaling", "only no scaling or Llama 3's 'llama3' is supported")
        if rope_type == "llama3":
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                value = self.rope_scaling.get(key)
                need(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, "rope_scaling",
                     f"Llama 3 scaling needs a positive `{key}`")
        return self

    @classmethod
    def read_special(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """RoPE in the transformers 5.x `rope_parameters` form or the legacy `rope_theta` + `rope_scaling`;
        a scaling of type "default" is no scaling."""
        theta, scaling = raw.get("rope_theta"), raw.get("rope_scaling")
        parameters = raw.get("rope_parameters")
        if isinstance(parameters, dict):
            theta = parameters.get("rope_theta", 10000.0) if theta is None else theta
            if parameters.get("rope_type", "default") != "default" and scaling is None:
                scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        return {"rope_theta": 10000.0 if theta is None else theta, "rope_scaling": scaling}
