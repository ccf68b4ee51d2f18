"""Model size arithmetic from the config alone: parameters, KV-cache bytes and FLOPs per token.

Nothing is allocated, so this sizes DeepSeek-V3 (671B) as readily as the tiny test model. "Activated"
parameters follow DeepSeek's accounting (README_WEIGHTS.md: 36.6B for V3 including the 0.9B output head;
an earlier revision said 36.7B counting the embedding too): per token the embedding table contributes one
row, so it is not counted; the head, every attention and dense weight, the router, the shared experts and K
routed experts are. The V3 paper rounds the same figure to 37B. DeepSeek-V2's routers have no correction bias
(V2 paper §2.2); counted the same way, V2 is 235.7B total, 20.9B activated (the paper's 236B and 21B, §3.1.2),
and V2-Lite 15.7B total, 2.45B activated, which appendix B gives as 2.4B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import DenseConfig, ModelConfig

if TYPE_CHECKING:
    from .model import LanguageModel


@dataclass(frozen=True)
class ParameterCounts:
    total: int  # main model, every parameter (embedding and head included)
    activated: int  # main model, per token
    mtp_total: int  # MTP modules' own parameters (embedding and head are shared, not counted)
    mtp_activated: int  # MTP modules per token, including the shared output head they use
    mtp_stored: int  # MTP parameters in a checkpoint, which stores a copy of embedding and head per module


def _attention(c: ModelConfig) -> int:
    d, heads = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank is None:
        query = d * heads * c.qk_head_dim
    else:
        query = d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * c.qk_head_dim
    kv = d * c.kv_cache_dim + c.kv_lora_rank + c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)
    out = heads * c.v_head_dim * d
    bias = (c.q_lora_rank or 0) + c.kv_cache_dim + d if c.attention_bias else 0
    return query + kv + out + bias + _indexer(c)


def _indexer(c: ModelConfig) -> int:
    """DeepSeek-V3.2's lightning indexer: wq_b, wk, k_norm (weight and bias), weights_proj; none before."""
    if not c.index_cache_dim:
        return 0
    width, heads, d = c.index_head_dim, c.index_n_heads, c.hidden_size
    return c.q_lora_rank * heads * width + d * width + 2 * width + d * heads


def _swiglu(d: int, inner: int) -> int:
    return 3 * d * inner


def _moe(c: ModelConfig, activated: bool) -> int:
    d = c.hidden_size
    experts = c.num_experts_per_tok if activated else c.n_routed_experts
    router = c.n_routed_experts * d + (c.n_routed_experts if c.correction_bias else 0)  # V2: no bias
    return router + (experts + c.n_shared_experts) * _swiglu(d, c.moe_intermediate_size)


def _dense_counts(c: DenseConfig) -> ParameterCounts:
    """Llama / Qwen2: the same accounting (the embedding is not activated; a tied head is the same matrix)."""
    d, hd = c.hidden_size, c.head_size
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attention = d * (q + 2 * kv) + q * d + ((q + 2 * kv) if c.qkv_bias else 0) + (d if c.attention_bias else 0)
    layer = attention + _swiglu(d, c.intermediate_size) + 2 * d
    embed, head = c.vocab_size * d, 0 if c.tie_word_embeddings else c.vocab_size * d
    total = c.num_hidden_layers * layer + embed + head + d
    return ParameterCounts(total, total - (embed if head else 0), 0, 0, 0)


def parameter_counts(c: ModelConfig | DenseConfig) -> ParameterCounts:
    if isinstance(c, DenseConfig):
        return _dense_counts(c)
    d = c.hidden_size
    block_norms = 2 * d
    dense_layers = c.first_k_dense_replace
    moe_layers = c.num_hidden_layers - dense_layers
    dense_block = _attention(c) + block_norms + _swiglu(d, c.intermediate_size)
    embed, head, final_norm = c.vocab_size * d, c.vocab_size * d, d
    total = (dense_layers * dense_block + moe_layers * (_attention(c) + block_norms + _moe(c, False))
             + embed + head + final_norm)
    activated = (dense_layers * dense_block + moe_layers * (_attention(c) + block_norms + _moe(c, True))
                 + head + final_norm)
    mtp_own = _attention(c) + block_norms + 2 * d + 2 * d * d + d  # + enorm, hnorm, eh_proj, shared_head.norm
    depth = c.num_nextn_predict_layers
    return ParameterCounts(
        total=total,
        activated=activated,
        mtp_total=depth * (mtp_own + _moe(c, False)),
        mtp_activated=depth * (mtp_own + _moe(c, True)) + (head if depth else 0),
        mtp_stored=depth * (mtp_own + _moe(c, False) + embed + head),
    )


def _head_width(c: ModelConfig | DenseConfig) -> int:
    """A query head's key plus value width: what multi-head attention caches and multiplies per head."""
    return 2 * c.head_size if isinstance(c, DenseConfig) else c.qk_head_dim + c.v_head_dim


def kv_cache_bytes_per_token(c: ModelConfig | DenseConfig, dtype_bytes: int = 2) -> tuple[int, int]:
    """(the model's cache, the equivalent multi-head cache) in bytes per token over all layers. MLA caches
    d_c + d_h^R elements per token and layer (DeepSeek-V2 Table 1), grouped-query attention its KV heads'
    keys and values; multi-head attention would cache every head's. DeepSeek-V3.2's cache also holds each
    token's indexer key (`index_cache_bytes_per_token` for its own share)."""
    cached = (c.kv_cache_dim + c.index_cache_dim) * c.num_hidden_layers * dtype_bytes
    expanded = c.num_attention_heads * _head_width(c) * c.num_hidden_layers * dtype_bytes
    return cached, expanded


def index_cache_bytes_per_token(c: ModelConfig | DenseConfig, dtype_bytes: int = 2) -> tuple[int, int]:
    """(the indexer keys in the cache at `dtype_bytes`, the same in the released FP8 form) in bytes per token
    over all layers; zero before DeepSeek-V3.2. DeepSeek-V3.2-Exp's `inference/model.py` caches each key as
    index_head_dim FP8 values and one fp32 scale per 128 values (`act_quant`, block size 128)."""
    if isinstance(c, DenseConfig) or not c.index_cache_dim:
        return 0, 0
    fp8 = c.index_head_dim + 4 * -(-c.index_head_dim // 128)
    return c.index_cache_dim * c.num_hidden_layers * dtype_bytes, fp8 * c.num_hidden_layers


def forward_flops_per_token(c: ModelConfig | DenseConfig, context: int) -> tuple[int, int]:
    """(matmul FLOPs with the activated weights, attention FLOPs at `context` keys) for one token's forward.

    The first is the usual 2N with N the activated parameters (norm weights, a negligible part, included);
    the second is QK^T and PV in multi-head form: 2 * heads * (d_qk + d_v) * context per layer; past
    `index_topk` keys, DeepSeek-V3.2's sparse attention, absorbed, 2 * heads * (2 d_c + d_r) * index_topk, plus
    the indexer's 2 * index_n_heads * index_head_dim * context (its ReLU and head weights not counted).
    """
    weights = 2 * parameter_counts(c).activated
    attention = 2 * c.num_attention_heads * _head_width(c) * context
    if isinstance(c, ModelConfig) and c.index_cache_dim and context > c.index_topk:
        # DSA: the absorbed attention over the top-k latents (scores in d_c + d_r, output in d_c), the indexer
        # over every key
        attention = 2 * c.num_attention_heads * (2 * c.kv_lora_rank + c.qk_rope_head_dim) * c.index_topk
        attention += 2 * c.index_n_heads * c.index_head_dim * context
    return weights, attention * c.num_hidden_layers


def human(n: float, unit: str = "") -> str:
    """1.23B (counts), or with a unit SI prefixes: 93.7 GFLOP; bytes use binary prefixes: 68.6 KiB."""
    if unit == "B":
        steps = ((1024**4, " TiB"), (1024**3, " GiB"), (1024**2, " MiB"), (1024, " KiB"))
        return next((f"{n / s:.1f}{p}" for s, p in steps if abs(n) >= s), f"{n:.0f} B")
    prefixes = ("T", "G", "M", "K") if unit else ("T", "B", "M", "K")
    for scale, prefix in zip((1e12, 1e9, 1e6, 1e3), prefixes, strict=True):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{' ' if unit else ''}{prefix}{unit}"
    return f"{n:.0f}{' ' + unit if unit else ''}"


def _quantized_matrix_bytes(model: LanguageModel, quantize: str) -> dict[int, int]:
    """Parameter id -> its bytes in `quantize`'s format, for the matrices `model.quantized` quantises."""
    from .model.moe import RoutedExperts
    from .model.quantized import quantized_bytes, quantizes

    sizes = {}
    for name, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            experts, inner, hidden = module.w_down.shape  # [E, I, d]
            sizes[id(module.w_gate_up)] = experts * quantized_bytes(2 * inner, hidden, quantize)
            sizes[id(module.w_down)] = experts * quantized_bytes(hidden, inner, quantize)
        elif quantizes(name.rsplit(".", 1)[-1], module) and module.weight is not model.model.embed_tokens.weight:
            sizes[id(module.weight)] = quantized_bytes(*module.weight.shape, quantize)
    return sizes


def weight_bytes(c: ModelConfig | DenseConfig, dtype_bytes: int = 2, quantize: str | None = None) -> tuple[int, int]:
    """(main model, MTP modules) weight bytes in memory: with `quantize`, every matrix `model.quantized`
    quantises in that format (by its rule, with its fallbacks), the rest (embedding, norms, router, MLA's
    kv_b_proj) at `dtype_bytes`. Counted on the meta device: exact, nothing allocated."""
    import torch

    from .model import build_model
    from .model.quantized import quantized_bytes

    with torch.device("meta"):
        model = build_model(c)
    embedding = model.model.embed_tokens.weight
    quantized = _quantized_matrix_bytes(model, quantize) if quantize else {}
    totals = [0, 0]
    for name, param in model.named_parameters():
        totals[name.startswith("mtp.")] += quantized.get(id(param), param.numel() * dtype_bytes)
    if quantize and model.lm_head.weight is embedding:  # a tied head is quantised as a copy of its own
        totals[0] += quantized_bytes(*embedding.shape, quantize)
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}  # a tied head: twice
    for name, buffer in model.state_dict().items():  # persistent buffers (router biases), kept in fp32
        if name not in parameters:
            totals[name.startswith("mtp.")] += buffer.numel() * 4
    return totals[0], totals[1]
