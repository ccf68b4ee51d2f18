"""ModelConfig: the fields and JSON of transformers' `DeepseekV3Config`, validation and presets.

The field names, meanings and defaults follow transformers' `configuration_deepseek_v3.py`. `config.json` is
read in every form found in the wild (legacy `rope_scaling` + `rope_theta`, transformers 5.x
`rope_parameters`) and written in the legacy form that DeepSeek's own releases use, which transformers 4.x and
5.x, vLLM and SGLang all read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .base import COMMON_IGNORED_KEYS, ConfigError, HFConfig

SUPPORTED_MODEL_TYPES = ("deepseek_v3",)

# Keys of DeepSeek's hub config.json that the native transformers model ignores (it hard-codes sigmoid
# scoring and bias-corrected top-k). They are
# kept so that a config survives a load/save round trip, and checked where they would change the model.
_HUB_ONLY_KEYS = ("topk_method", "scoring_func", "aux_loss_alpha", "seq_aux", "ep_size", "pretraining_tp")


@dataclass
class ModelConfig(HFConfig):
    """DeepSeek-V3's config.json (transformers' `DeepseekV3Config`)."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = SUPPORTED_MODEL_TYPES
    IGNORED_KEYS: ClassVar[frozenset[str]] = COMMON_IGNORED_KEYS | {
        "num_mtp_layers", "head_dim", "qk_head_dim", "output_router_logits", "rope_parameters"}
    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ("quantization_config",)

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    # YaRN parameters in the legacy form {"type": "yarn", "factor", "beta_fast", "beta_slow", "mscale",
    # "mscale_all_dim", "original_max_position_embeddings"}; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 1
    quantization_config: dict[str, Any] | None = None
    # Keys we do not model but keep for a faithful round trip (e.g. `topk_method`, `scoring_func`).
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer by absorbed MLA: the normalised c_kv and the roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> ModelConfig:
        """Check the shapes transformers' DeepseekV3 modules assume (and basic sanity); raise ConfigError
        naming field and rule."""

        need = self.need
        self.need_positive_ints((
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings"))
        self.need_bools(("rope_interleave", "norm_topk_prob", "attention_bias", "tie_word_embeddings"))
        self.need_numbers(("rms_norm_eps", "routed_scaling_factor", "initializer_range", "attention_dropout"))
        self.need_ints(("first_k_dense_replace", "num_nextn_predict_layers", "n_shared_experts", "moe_layer_freq"))
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", "must be a positive integer or null (no query compression)")
        need(self.num_key_value_heads == self.num_attention_heads, "num_key_value_heads",
             f"must equal num_attention_heads ({self.num_attention_heads}): MLA has no grouped KV heads")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        need(self.n_routed_experts % self.n_group == 0, "n_routed_experts",
             f"must be divisible by n_group ({self.n_group})")
        need(self.n_routed_experts // self.n_group >= 2, "n_group",
             f"must leave at least 2 experts per group (n_routed_experts={self.n_routed_experts}); "
             "a group's score is the sum of its top-2 experts")
        need(self.topk_group <= self.n_group, "topk_group", f"must be <= n_group ({self.n_group})")
        reachable = self.topk_group * self.n_routed_experts // self.n_group
        need(self.num_experts_per_tok <= reachable, "num_experts_per_tok",
             f"must be <= topk_group * n_routed_experts / n_group = {reachable}, the experts a token can reach")
        need(self.n_shared_experts >= 1, "n_shared_experts",
             "must be >= 1 (DeepSeek-V3 always has a shared expert; transformers expects its weights)")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be between 0 and num_hidden_layers ({self.num_hidden_layers})")
        need(self.moe_layer_freq == 1, "moe_layer_freq",
             "must be 1: DeepSeek-V3 makes every layer from first_k_dense_replace on an MoE layer")
        need(self.hidden_act == "silu", "hidden_act", "must be 'silu' (SwiGLU)")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(not self.tie_word_embeddings, "tie_word_embeddings", "must be false: DeepSeek-V3's head is untied")
        scoring = self.extra.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise ConfigError(f"config field `scoring_func` = {scoring!r}: must be 'sigmoid' "
                              "(softmax routing is DeepSeek-V2, which this model does not implement)")
        topk_method = self.extra.get("topk_method", "noaux_tc")
        if topk_method != "noaux_tc":
            raise ConfigError(f"config field `topk_method` = {topk_method!r}: must be 'noaux_tc' "
                              "(bias-corrected group-limited top-k, V3 paper eqs. 15-16)")
        self._validate_rope_scaling()
        self._validate_quantization()
        return self

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        kind = rs.get("type")
        if kind != "yarn":
            raise ConfigError(f"config field `rope_scaling.type` = {kind!r}: only 'yarn' (or no scaling) is "
                              "supported")
        for key in ("factor", "original_max_position_embeddings"):
            if not isinstance(rs.get(key), (int, float)) or isinstance(rs[key], bool) or rs[key] <= 0:
                raise ConfigError(f"config field `rope_scaling.{key}` = {rs.get(key)!r}: YaRN needs a positive "
                                  "number")

    def _validate_quantization(self) -> None:
        qc = self.quantization_config
        if qc is None:
            return
        method = qc.get("quant_method")
        if method != "fp8":
            raise ConfigError(f"config field `quantization_config.quant_method` = {method!r}: only block 'fp8' "
                              "checkpoints are supported")
        block = qc.get("weight_block_size", [128, 128])
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and
                all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ConfigError(f"config field `quantization_config.weight_block_size` = {block!r}: must be two "
                              "positive integers")

    # ---- JSON ----------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return "DeepseekV3ForCausalLM"

    @classmethod
    def read_special(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """RoPE in the legacy or the transformers 5.x form; MTP depth under its older name."""
        rope_theta, rope_scaling = _read_rope(raw)
        special: dict[str, Any] = {"rope_theta": rope_theta, "rope_scaling": rope_scaling}
        if "num_mtp_layers" in raw and "num_nextn_predict_layers" not in raw:
            special["num_nextn_predict_layers"] = raw["num_mtp_layers"]
        return special


def _read_rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, legacy rope_scaling dict or None) from either config.json form
    (transformers 4.x `rope_scaling`, 5.x `rope_parameters`).

    As in transformers, a legacy `rope_scaling` wins over `rope_parameters` when both are present.
    """
    params, legacy = raw.get("rope_parameters"), raw.get("rope_scaling")
    theta = raw.get("rope_theta")
    source = legacy if legacy is not None else params
    if source is not None and not isinstance(source, dict):
        name = "rope_scaling" if legacy is not None else "rope_parameters"
        raise ConfigError(f"config field `{name}` = {source!r}: must be an object or null")
    if isinstance(params, dict) and theta is None:
        theta = params.get("rope_theta")
    scaling = None
    if source is not None:
        kind = source.get("type", source.get("rope_type", "default"))
        if kind != "default":
            scaling = {k: v for k, v in source.items() if k not in ("rope_theta", "rope_type")}
            scaling["type"] = kind
    if scaling is not None and kind == "yarn":
        # transformers' fallbacks: the original length defaults to max_position_embeddings, the factor to
        # their ratio
        if scaling.get("original_max_position_embeddings") is None:
            scaling["original_max_position_embeddings"] = raw.get(
                "original_max_position_embeddings", raw.get("max_position_embeddings"))
        if scaling.get("factor") is None and isinstance(raw.get("max_position_embeddings"), int) and \
                isinstance(scaling["original_max_position_embeddings"], (int, float)):
            scaling["factor"] = raw["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    if theta is None:
        theta = 10000.0
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise ConfigError(f"config field `rope_theta` = {theta!r}: must be a number")
    return float(theta), scaling


# ---- presets -------------------------------------------------------------------------------------
def _yarn(factor: float, original: int, mscale: float = 1.0) -> dict[str, Any]:
    return {"type": "yarn", "factor": factor, "beta_fast": 32, "beta_slow": 1, "mscale": mscale,
            "mscale_all_dim": mscale, "original_max_position_embeddings": original}


PRESETS: dict[str, dict[str, Any]] = {
    # Tests: every dimension distinct where a mix-up would hide.
    "tiny": dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2, max_position_embeddings=640,
        rope_scaling=_yarn(40, 16), num_nextn_predict_layers=1,
    ),
    # The speedrun's model: small enough to learn its reasoning task in a few minutes of one CPU core; no MTP
    # module, which would cost a third of that.
    "micro": dict(
        vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64,
        kv_lora_rank=48, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, max_position_embeddings=2048,
        num_nextn_predict_layers=0,
    ),
    # CPU default: a few million parameters, trains in minutes on 2 cores.
    "nano": dict(
        vocab_size=4096, hidden_size=192, intermediate_size=512, moe_intermediate_size=96, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, max_position_embeddings=2048,
        num_nextn_predict_layers=1,
    ),
    # The ~107M total / 26M active reference config of DESIGN.md (CPU benchmarks).
    "small": dict(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256, num_hidden_layers=8,
        first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=192,
        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, max_position_embeddings=4096,
        num_nextn_predict_layers=1,
    ),
    # DeepSeek-V2-Lite's shapes (16B total, 2.4B active; DS config_16B.json) with V3 routing.
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False, max_position_embeddings=163840,
        rope_scaling=_yarn(40, 4096, 0.707), num_nextn_predict_layers=0, bos_token_id=100000,
        eos_token_id=100001,
    ),
    # DeepSeek-V3 / R1 (671B); for sizing only, never allocated. Hub config.json values.
    "deepseek-v3": dict(
        rope_scaling=_yarn(40, 4096), quantization_config={
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named config (`tiny`, `nano`, `micro`, `small`, `deepseek-v2-lite`, `deepseek-v3`), optionally
    changed."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides}).validate()


def yarn_mscale(scale: float, mscale: float) -> float:
    """YaRN's magnitude correction sqrt(t) = 0.1 * mscale * ln(s) + 1 (YaRN, arXiv 2309.00071; V3 paper §4.3)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
