"""ModelConfig: the fields and JSON of transformers' `DeepseekV3Config`, its DeepSeek-V2 sibling
`DeepSeekV2Config` (transformers' `DeepseekV2Config`), validation and presets.

The field names, meanings and defaults follow transformers' `configuration_deepseek_v3.py` and
`configuration_deepseek_v2.py`. `config.json` is read in every form found in the wild (legacy `rope_scaling` +
`rope_theta`, transformers 5.x `rope_parameters`) and written in the legacy form that DeepSeek's own releases
use, which transformers 4.x and 5.x, vLLM and SGLang all read.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .base import COMMON_IGNORED_KEYS, ConfigError, HFConfig

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "deepseek_v32")
# DeepSeek-V2's selections (V2 paper §2.2.1-2.2.2): plain top-K, or top-K within the topk_group groups
# (devices) holding the best experts ("device-limited routing").
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


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
    # Keys of DeepSeek's hub config.json (not fields of transformers' DeepseekV3Config, which hard-codes them):
    # the routing they name is checked against the model type.
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    # Keys we do not model but keep for a faithful round trip (e.g. `aux_loss_alpha`, `seq_aux`, `ep_size`).
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer by absorbed MLA: the normalised c_kv and the roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def index_cache_dim(self) -> int:
        """Values cached per token per layer for DSA's lightning indexer: none before DeepSeek-V3.2."""
        return 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    @property
    def correction_bias(self) -> bool:
        """Whether each router has an `e_score_correction_bias`: DeepSeek-V3's auxiliary-loss-free balancing
        (V3 paper §2.1.2), which only its `noaux_tc` selection uses."""
        return self.topk_method == "noaux_tc"

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> ModelConfig:
        """Check the shapes transformers' DeepseekV3 (or DeepseekV2) modules assume (and basic sanity); raise
        ConfigError naming field and rule."""
        self._validate_shapes()
        self._validate_routing()
        self._validate_rope_scaling()
        self._validate_quantization()
        return self

    def _validate_shapes(self) -> None:
        """The rules V2 and V3 share: MLA, the FFNs and the layer plan are the same in both."""
        need = self.need
        self.need_positive_ints((
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "n_routed_experts", "num_experts_per_tok", "max_position_embeddings"))
        self.need_bools(("rope_interleave", "norm_topk_prob", "attention_bias", "tie_word_embeddings"))
        self.need_numbers(("rms_norm_eps", "routed_scaling_factor", "initializer_range", "attention_dropout"))
        self.need_ints(("first_k_dense_replace", "num_nextn_predict_layers", "n_shared_experts", "moe_layer_freq"))
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", "must be a positive integer or null (no query compression)")
        need(self.num_key_value_heads == self.num_attention_heads, "num_key_value_heads",
             f"must equal num_attention_heads ({self.num_attention_heads}): MLA has no grouped KV heads")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        need(self.n_shared_experts >= 1, "n_shared_experts",
             "must be >= 1 (DeepSeek-V2 and V3 always have shared experts; transformers expects their weights)")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be between 0 and num_hidden_layers ({self.num_hidden_layers})")
        need(self.moe_layer_freq == 1, "moe_layer_freq",
             "must be 1: transformers makes every layer from first_k_dense_replace on an MoE layer")
        need(self.hidden_act == "silu", "hidden_act", "must be 'silu' (SwiGLU)")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(not self.tie_word_embeddings, "tie_word_embeddings", "must be false: DeepSeek's output head is untied")

    def _validate_routing(self) -> None:
        """DeepSeek-V3's router: sigmoid affinities, bias-corrected group-limited top-k (V3 paper eqs. 15-16)."""
        need = self.need
        self.need_positive_ints(("n_group", "topk_group"))
        need(self.scoring_func == "sigmoid", "scoring_func",
             "must be 'sigmoid' for deepseek_v3 (softmax scoring is DeepSeek-V2's: model_type deepseek_v2)")
        need(self.topk_method == "noaux_tc", "topk_method",
             "must be 'noaux_tc' (bias-corrected group-limited top-k, V3 paper eqs. 15-16) for deepseek_v3; "
             "'greedy' and 'group_limited_greedy' are DeepSeek-V2's (model_type deepseek_v2)")
        self._validate_groups(2, "a group's score is the sum of its top-2 experts")

    def _validate_groups(self, per_group: int, why: str) -> None:
        """Group-limited selection: whole groups, at least `per_group` experts each, enough experts reachable."""
        need = self.need
        need(self.n_routed_experts % self.n_group == 0, "n_routed_experts",
             f"must be divisible by n_group ({self.n_group})")
        need(self.n_routed_experts // self.n_group >= per_group, "n_group",
             f"must leave at least {per_group} expert{'s' if per_group > 1 else ''} per group "
             f"(n_routed_experts={self.n_routed_experts}); {why}")
        need(self.topk_group <= self.n_group, "topk_group", f"must be <= n_group ({self.n_group})")
        reachable = self.topk_group * self.n_routed_experts // self.n_group
        need(self.num_experts_per_tok <= reachable, "num_experts_per_tok",
             f"must be <= topk_group * n_routed_experts / n_group = {reachable}, the experts a token can reach")

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
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:  # type: ignore[override]
        """Build from a config.json dict and validate; read through `ModelConfig`, a `deepseek_v2` config gives
        a `DeepSeekV2Config` (transformers' defaults differ between the two, so the class must match)."""
        if cls is ModelConfig and raw.get("model_type") != "deepseek_v3":
            if raw.get("model_type") == "deepseek_v2":
                return DeepSeekV2Config.from_dict(raw)
            if raw.get("model_type") == "deepseek_v32":
                return DeepSeekV32Config.from_dict(raw)
            raise ConfigError(f"config field `model_type` = {raw.get('model_type')!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        return super().from_dict(raw)

    @classmethod
    def read_special(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """RoPE in the legacy or the transformers 5.x form; MTP depth under its older name."""
        rope_theta, rope_scaling = _read_rope(raw)
        special: dict[str, Any] = {"rope_theta": rope_theta, "rope_scaling": rope_scaling}
        if "num_mtp_layers" in raw and "num_nextn_predict_layers" not in raw:
            special["num_nextn_predict_layers"] = raw["num_mtp_layers"]
        return special


@dataclass
class DeepSeekV2Config(ModelConfig):
    """DeepSeek-V2's config.json (transformers' `DeepseekV2Config`, whose defaults these are: a field that
    config.json leaves out means what it means to transformers).

    MLA and the DeepSeekMoE layout are V3's; the router differs (V2 paper §2.2.1-2.2.2): softmax affinities,
    `greedy` or `group_limited_greedy` (device-limited) top-k, gates that are the affinities times
    `routed_scaling_factor`, no correction bias. V2 has no MTP module and always rotates interleaved pairs
    (`apply_rotary_emb` in `modeling_deepseek_v2.py`), so `rope_interleave` and `num_nextn_predict_layers`,
    V3's fields, are not written.
    """

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("deepseek_v2",)
    V3_ONLY_KEYS: ClassVar[tuple[str, ...]] = ("rope_interleave", "num_nextn_predict_layers")

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads, as transformers
    n_shared_experts: int = 2
    n_routed_experts: int = 64
    routed_scaling_factor: float = 1.0
    n_group: int | None = None  # only group_limited_greedy reads the two group fields
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    num_nextn_predict_layers: int = 0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    @property
    def architecture(self) -> str:
        return "DeepseekV2ForCausalLM"

    def _validate_routing(self) -> None:
        """DeepSeek-V2's router (V2 paper §2.2.1-2.2.2; transformers' `DeepseekV2TopkRouter`)."""
        need = self.need
        need(self.scoring_func == "softmax", "scoring_func",
             "must be 'softmax' for deepseek_v2 (sigmoid scoring is DeepSeek-V3's: model_type deepseek_v3)")
        need(self.topk_method in V2_TOPK_METHODS, "topk_method",
             "must be 'greedy' or 'group_limited_greedy' for deepseek_v2 ('noaux_tc', bias-corrected top-k, is "
             "DeepSeek-V3's: model_type deepseek_v3)")
        # transformers' DeepseekV2 never renormalises the top-k gates, DeepSeek's own modeling_deepseek.py
        # renormalises and then drops routed_scaling_factor: the flag has no agreed meaning, and every released
        # V2 model sets it false (the paper's gates are the affinities themselves).
        need(not self.norm_topk_prob, "norm_topk_prob",
             "must be false for deepseek_v2: transformers' DeepseekV2 ignores it, so a checkpoint that sets it "
             "would not mean the same model there")
        need(self.num_nextn_predict_layers == 0, "num_nextn_predict_layers",
             "must be 0: DeepSeek-V2 has no multi-token prediction module")
        need(self.rope_interleave is True, "rope_interleave",
             "must be true: DeepSeek-V2 always rotates interleaved pairs")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"must be <= n_routed_experts ({self.n_routed_experts})")
        need(self.extra.get("mlp_bias", False) is False, "mlp_bias", "must be false: DeepSeek's FFNs have no biases")
        if self.topk_method == "greedy":
            for name in ("n_group", "topk_group"):  # unused by greedy, but must still be well formed
                value = getattr(self, name)
                need(value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0),
                     name, "must be a positive integer or null")
            return
        self.need_positive_ints(("n_group", "topk_group"))
        self._validate_groups(1, "a group's score is its best expert's")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in self.V3_ONLY_KEYS:
            out.pop(key, None)
        return out


@dataclass
class DeepSeekV32Config(ModelConfig):
    """DeepSeek-V3.2's config.json (transformers' `DeepseekV32Config`): DeepSeek-V3 plus the lightning indexer
    of DeepSeek Sparse Attention (V3.2 paper §2.1) in every layer.

    transformers' class derives `mlp_layer_types` from `first_k_dense_replace` and makes every layer
    `indexed_attention`; a config.json that spells either out must agree with that. Its MLA always rotates
    interleaved pairs (`apply_rotary_pos_emb_interleave`) and always compresses the query (the indexer reads the
    compressed query), so `rope_interleave` must be true and `q_lora_rank` set.
    """

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("deepseek_v32",)
    IGNORED_KEYS: ClassVar[frozenset[str]] = ModelConfig.IGNORED_KEYS | {"mlp_layer_types", "layer_types"}

    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 64

    @property
    def architecture(self) -> str:
        return "DeepseekV32ForCausalLM"

    @property
    def index_cache_dim(self) -> int:
        """The indexer's key, one `index_head_dim` vector per token per layer (V3.2 paper §2.1)."""
        return self.index_head_dim

    @classmethod
    def from_v3(cls, config: ModelConfig, **index: Any) -> DeepSeekV32Config:
        """A DeepSeek-V3 config with the indexer added: the starting point of V3.2's continued pre-training
        (V3.2-Exp report §2.1.1). `index_topk` defaults to V3.2's 2,048; `index_head_dim` and `index_n_heads`
        to V3.2's proportions: twice the RoPE width (128 = 2 x 64), and heads enough for a ninth of the
        absorbed attention's work per key (64 x 128 against 128 x (512 + 64))."""
        if type(config) is not ModelConfig:
            raise ConfigError(f"config field `model_type` = {config.MODEL_TYPES[0]!r}: the indexer is added to a "
                              "DeepSeek-V3 model (model_type 'deepseek_v3')")
        index = {key: value for key, value in index.items() if value is not None}
        width = index.get("index_head_dim", 2 * config.qk_rope_head_dim)
        per_key = config.num_attention_heads * config.kv_cache_dim
        heads = max(1, round(per_key / 9 / max(1, width)))  # a bad width is refused by validate
        chosen = {"index_topk": 2048, "index_head_dim": width, "index_n_heads": heads, **index}
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(ModelConfig)}
        return cls(**{**fields, "extra": dict(config.extra), **chosen}).validate()

    def validate(self) -> DeepSeekV32Config:
        super().validate()
        need = self.need
        self.need_positive_ints(("index_topk", "index_head_dim", "index_n_heads"))
        need(self.q_lora_rank is not None, "q_lora_rank",
             "must be set for deepseek_v32: the indexer's queries come from the compressed query")
        need(self.rope_interleave is True, "rope_interleave",
             "must be true for deepseek_v32: its MLA always rotates interleaved pairs")
        need(self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim",
             f"must be >= qk_rope_head_dim ({self.qk_rope_head_dim}): the indexer ropes its first "
             "qk_rope_head_dim values")
        return self

    @classmethod
    def read_special(cls, raw: dict[str, Any]) -> dict[str, Any]:
        special = super().read_special(raw)
        layers = raw.get("num_hidden_layers", cls.num_hidden_layers)
        dense = min(raw.get("first_k_dense_replace", cls.first_k_dense_replace), layers)
        expected = {"mlp_layer_types": ["dense"] * dense + ["sparse"] * (layers - dense),
                    "layer_types": ["indexed_attention"] * layers}
        for key, value in expected.items():
            if raw.get(key) is not None and raw[key] != value:
                raise ConfigError(f"config field `{key}` = {raw[key]!r}: must be {value!r} (first_k_dense_replace "
                                  "dense layers, then MoE; every layer indexed), the only layout modelled")
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
    # DeepSeek-V2-Lite (15.7B total, 2.4B activated; V2 paper appendix B), its hub config.json's values:
    # plain top-6 of 64 softmax-scored experts, gates unscaled. Sizing; never allocated by the tests.
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False, max_position_embeddings=163840,
        rope_scaling=_yarn(40, 4096, 0.707), bos_token_id=100000, eos_token_id=100001,
    ),
    # DeepSeek-V2 (236B total, 21B activated; V2 paper §3.1.2), its hub config.json's values: device-limited
    # routing, top-6 of 160 experts from the best 3 of 8 groups, gates scaled by 16. Sizing only.
    "deepseek-v2": dict(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, first_k_dense_replace=1, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
        topk_method="group_limited_greedy", routed_scaling_factor=16.0, norm_topk_prob=False,
        max_position_embeddings=163840, rope_scaling=_yarn(40, 4096, 0.707), bos_token_id=100000,
        eos_token_id=100001,
    ),
    # DeepSeek-V3 / R1 (671B); for sizing only, never allocated. Hub config.json values.
    "deepseek-v3": dict(
        rope_scaling=_yarn(40, 4096), quantization_config={
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
    ),
    # DeepSeek-V3.2 (-Exp): V3 with the lightning indexer of DeepSeek Sparse Attention, its hub config.json's
    # values (64 indexer heads of 128, top-2048). Sizing only.
    "deepseek-v3.2": dict(
        rope_scaling=_yarn(40, 4096), index_n_heads=64, index_head_dim=128, index_topk=2048,
        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                             "weight_block_size": [128, 128]},
    ),
}
# The presets of DeepSeek-V2's family and of DeepSeek-V3.2's; the rest are DeepSeek-V3's.
V2_PRESETS = frozenset({"deepseek-v2-lite", "deepseek-v2"})
V32_PRESETS = frozenset({"deepseek-v3.2"})


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named config (`tiny`, `nano`, `micro`, `small`, `deepseek-v2-lite`, `deepseek-v2`, `deepseek-v3`,
    `deepseek-v3.2`), optionally changed; the V2 ones are `DeepSeekV2Config`s, the V3.2 one a
    `DeepSeekV32Config`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    family = DeepSeekV2Config if name in V2_PRESETS else DeepSeekV32Config if name in V32_PRESETS else ModelConfig
    return family(**{**PRESETS[name], **overrides}).validate()


def extended_context(config: ModelConfig, length: int, trained: int | None = None) -> ModelConfig:
    """The config with its RoPE stretched by YaRN to `length` positions from the `trained` length (default: an
    existing YaRN's original length, else max_position_embeddings): s = length / trained, beta 32 and 1, as
    DeepSeek-V3 extends 4K to 128K (V3 paper §4.3); an existing YaRN's mscale is kept."""
    scaling = config.rope_scaling or {}
    if scaling and scaling.get("type", scaling.get("rope_type")) != "yarn":
        raise ConfigError(f"rope_scaling {scaling}: only a model without scaling or with YaRN is extended")
    original = trained or int(scaling.get("original_max_position_embeddings", config.max_position_embeddings))
    if original < 1:
        raise ConfigError(f"--trained-context = {original}: must be >= 1")
    if length <= original:
        raise ConfigError(f"--extend-context = {length}: not longer than the trained context ({original})")
    mscale = float(scaling.get("mscale", 1.0))
    return config.replace(max_position_embeddings=length, rope_scaling=_yarn(length / original, original, mscale))


def yarn_mscale(scale: float, mscale: float) -> float:
    """YaRN's magnitude correction sqrt(t) = 0.1 * mscale * ln(s) + 1 (YaRN, arXiv 2309.00071; V3 paper §4.3)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
