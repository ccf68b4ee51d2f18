"""GGUF files in (llama.cpp's single-file format): a model's config, its tensors under Hugging Face names,
dequantised to fp32, its tokenizer and its sampling defaults, read with the `gguf` package (llama.cpp's
`gguf-py`: `GGUFReader`, `quants.dequantize`, the `constants` tables of metadata keys and tensor names).

What each architecture's file holds is what llama.cpp's `convert_hf_to_gguf.py` writes for it, and transformers'
GGUF loader (`modeling_gguf_pytorch_utils.py`, `integrations/ggml.py`, `integrations/gguf/
gguf_tokenizer_mapping.py`) reads llama and qwen2 the same way; the conventions undone here:

- a tensor's numpy shape (its GGUF dims reversed) is the PyTorch layout; `blk.{i}.attn_q.weight` and the other
  names of `gguf.constants.TENSOR_NAMES` map to the HF names below;
- llama: the converter permutes q and k (weights and biases) so that llama.cpp's adjacent-pair RoPE computes HF's
  rotate-half one (`LlamaModel.permute`); undone as transformers' `LlamaTensorProcessor` does. Qwen2 (NeoX RoPE)
  and deepseek2 (whose HF weights are already adjacent-pair) are stored unpermuted;
- llama 3: the RoPE scaling is not in the metadata but in a `rope_freqs.weight` tensor of per-frequency divisors
  (`LlamaModel.generate_extra_tensors`), read back into `rope_scaling` here (transformers ignores it);
- deepseek2 (DeepSeek-V2/V3, MLA): experts stacked [E, ...] in `ffn_{gate,up,down}_exps`; MLA's `kv_b_proj` whole
  (`attn_kv_b`, older files) or split into `attn_k_b` (transposed) and `attn_v_b`, for which newer files say
  `head_count_kv` = 1 and key/value lengths of the latent (the per-head ones under `key_length_mla`); the V3
  router bias as `exp_probs_b.bias`; `expert_gating_func` 2 = sigmoid (V3), 1 or absent = softmax (V2, the
  default llama.cpp gives files without the key); YaRN's mscale as `yarn_log_multiplier` = 0.1 * mscale_all_dim.

Everything is dequantised to fp32 on read, tensor by tensor (keeping blocks quantised is later work).
`gguf_export` writes these same conventions (its name tables are the ones here, inverted).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor
from gguf.constants import MODEL_TENSOR, TENSOR_NAMES
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _RustTokenizer
from torch import Tensor

from .config import FAMILIES, ConfigError, DenseConfig, ModelConfig, config_from_dict
from .hf_files import CheckpointError
from .tokenizer import Tokenizer

__all__ = ["DENSE_BLOCK_TENSORS", "EXPERT_TENSORS", "GGUF_SUFFIX", "GLOBAL_TENSORS", "MLA_BLOCK_TENSORS",
           "PRE_TOKENIZER_SPLITS", "SAMPLING_KEYS", "SUPPORTED_ARCHITECTURES", "SUPPORTED_TYPES", "GGUFContents",
           "GGUFTensors", "block_leaf", "is_gguf", "read_gguf", "read_gguf_config", "read_gguf_tokenizer"]

GGUF_SUFFIX = ".gguf"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "deepseek2")
# Every type the gguf package dequantises (it has no K-quant quantisers, but dequantises them all); F64 by a cast.
SUPPORTED_TYPES = tuple(getattr(GGMLQuantizationType, name) for name in (
    "F32", "F16", "BF16", "F64", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0",
    "MXFP4") if hasattr(GGMLQuantizationType, name))
_SOFTMAX, _SIGMOID = 1, 2  # llama.cpp's `expert_gating_func` values (gguf.constants.ExpertGatingFuncType)
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (gguf.constants.TokenType)

T = MODEL_TENSOR
# llama.cpp tensor (gguf.constants) -> HF name: the tables `gguf_export` inverts to write what is read here
GLOBAL_TENSORS = {T.TOKEN_EMBD: "model.embed_tokens", T.OUTPUT_NORM: "model.norm", T.OUTPUT: "lm_head"}
DENSE_BLOCK_TENSORS = {
    T.ATTN_NORM: "input_layernorm", T.ATTN_Q: "self_attn.q_proj", T.ATTN_K: "self_attn.k_proj",
    T.ATTN_V: "self_attn.v_proj", T.ATTN_OUT: "self_attn.o_proj", T.FFN_NORM: "post_attention_layernorm",
    T.FFN_GATE: "mlp.gate_proj", T.FFN_UP: "mlp.up_proj", T.FFN_DOWN: "mlp.down_proj"}
MLA_BLOCK_TENSORS = {
    T.ATTN_NORM: "input_layernorm", T.ATTN_Q: "self_attn.q_proj", T.ATTN_Q_A: "self_attn.q_a_proj",
    T.ATTN_Q_A_NORM: "self_attn.q_a_layernorm", T.ATTN_Q_B: "self_attn.q_b_proj",
    T.ATTN_KV_A_MQA: "self_attn.kv_a_proj_with_mqa", T.ATTN_KV_A_NORM: "self_attn.kv_a_layernorm",
    T.ATTN_KV_B: "self_attn.kv_b_proj", T.ATTN_OUT: "self_attn.o_proj", T.FFN_NORM: "post_attention_layernorm",
    T.FFN_GATE: "mlp.gate_proj", T.FFN_UP: "mlp.up_proj", T.FFN_DOWN: "mlp.down_proj", T.FFN_GATE_INP: "mlp.gate",
    T.FFN_GATE_SHEXP: "mlp.shared_experts.gate_proj", T.FFN_UP_SHEXP: "mlp.shared_experts.up_proj",
    T.FFN_DOWN_SHEXP: "mlp.shared_experts.down_proj",
    # the MTP module's own tensors (DeepSeek-V3.2's and GLM's converters); the rest of it is a decoder layer
    T.NEXTN_EH_PROJ: "eh_proj", T.NEXTN_EMBED_TOKENS: "embed_tokens", T.NEXTN_ENORM: "enorm",
    T.NEXTN_HNORM: "hnorm", T.NEXTN_SHARED_HEAD_HEAD: "shared_head.head", T.NEXTN_SHARED_HEAD_NORM: "shared_head.norm"}
EXPERT_TENSORS = {T.FFN_GATE_EXP: "gate_proj", T.FFN_UP_EXP: "up_proj", T.FFN_DOWN_EXP: "down_proj"}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)\.(weight|bias)")

# Pre-tokenizer splits by `tokenizer.ggml.pre` (the regexes of the models' own tokenizer.json files; llama.cpp's
# `llama-vocab.cpp` lists the same). Anything else gets GPT-2's byte-level split, as transformers gives it.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3_SPLITS = (r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
                     r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                     r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx"), (_LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), (_QWEN2_SPLIT,)),
    "deepseek-v3": _DEEPSEEK3_SPLITS,
}
_GPT2_PRE = ("gpt-2", "gpt2", "default")
# general.sampling.* (the sampler settings a file recommends) -> generation_config.json keys
SAMPLING_KEYS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "penalty_repeat": "repetition_penalty"}


class GGUFContents(NamedTuple):
    config: ModelConfig | DenseConfig
    tensors: GGUFTensors  # HF name -> fp32 tensor, dequantised when read
    tokenizer: Tokenizer | None  # None when the file has no tokenizer metadata (or it was not asked for)
    generation: dict[str, Any]  # as generation_config.json: bos/eos ids and the file's sampling defaults


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF file (by its suffix; a directory never is)."""
    path = Path(path)
    return path.suffix.lower() == GGUF_SUFFIX and not path.is_dir()


def read_gguf(path: str | os.PathLike, tokenizer: bool = True) -> GGUFContents:
    """Config, tensors (read lazily), tokenizer (when `tokenizer`) and generation defaults of a GGUF file;
    CheckpointError naming the file and the problem otherwise."""
    path = Path(path)
    reader, meta = _open(path)
    config = _config(meta, reader)
    tensors = GGUFTensors(path, _plan(meta, reader, config))
    return GGUFContents(config, tensors, _tokenizer(meta) if tokenizer else None, _generation(meta))


def read_gguf_config(path: str | os.PathLike) -> ModelConfig | DenseConfig:
    """The config alone, from the metadata and the tensor list (nothing dequantised)."""
    reader, meta = _open(Path(path))
    return _config(meta, reader)


def read_gguf_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer the file's metadata describes, or None when it has none."""
    return _tokenizer(_open(Path(path))[1])


# ---- the file and its metadata --------------------------------------------------------------------
class _Metadata:
    """The file's key/value metadata, decoded on demand (token lists are long), with errors naming the key."""

    def __init__(self, reader: GGUFReader, path: Path):
        self.fields, self.path = reader.fields, path
        self.arch = self.need("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            value = field.contents()
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{self.path}: metadata `{key}` is not UTF-8 text ({exc.reason})") from exc
        if field.types and field.types[0] == GGUFValueType.ARRAY and key.endswith("head_count_kv"):
            value = _one_value(value, key, self.path)  # some converters write one count per layer
        return default if value is None else value

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self.path}: GGUF metadata key `{key}` is missing (llama.cpp's converter "
                                  "writes it for this architecture)")
        return value

    def model(self, name: str, default: Any = None) -> Any:
        """`{arch}.{name}`, e.g. `llama.block_count`."""
        return self.get(f"{self.arch}.{name}", default)

    def need_model(self, name: str) -> Any:
        return self.need(f"{self.arch}.{name}")


def _one_value(values: list, key: str, path: Path) -> Any:
    if len(set(values)) != 1:
        raise CheckpointError(f"{path}: `{key}` differs between layers ({values}); nanoseek needs one value")
    return values[0]


def _open(path: Path) -> tuple[GGUFReader, _Metadata]:
    """The parsed file, its architecture and quantisation types checked; CheckpointError for a missing,
    truncated or foreign file, a split one, or an architecture or tensor type this reader does not support."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        reader = GGUFReader(path)
    except ValueError as exc:
        if "magic" in str(exc):
            raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic number at the start)") from exc
        if "GGMLQuantizationType" in str(exc):
            raise CheckpointError(f"{path}: a tensor has a type unknown to the installed gguf package ({exc}); "
                                  f"supported: {_type_names()}") from exc
        raise CheckpointError(f"{path}: cannot read the GGUF file ({exc}); it is truncated or corrupt") from exc
    except (IndexError, KeyError, OverflowError, TypeError, OSError, MemoryError) as exc:
        raise CheckpointError(f"{path}: cannot read the GGUF file ({type(exc).__name__}: {exc}); it is truncated "
                              "or corrupt") from exc
    meta = _Metadata(reader, path)
    if reader.byte_order != "I":
        raise CheckpointError(f"{path}: a GGUF file of the other byte order (big-endian); convert it on a "
                              "little-endian machine")
    if (meta.get("split.count") or 1) > 1:
        raise CheckpointError(f"{path}: one of {meta.get('split.count')} split GGUF files; merge them first "
                              "(llama.cpp's `llama-gguf-split --merge`)")
    if meta.arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {meta.arch!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise CheckpointError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, a type nanoseek "
                                  f"cannot dequantise; supported: {_type_names()}")
    return reader, meta


def _type_names() -> str:
    return ", ".join(kind.name for kind in SUPPORTED_TYPES)


# ---- the config -----------------------------------------------------------------------------------
def _config(meta: _Metadata, reader: GGUFReader) -> ModelConfig | DenseConfig:
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    raw = _deepseek_config(meta, shapes) if meta.arch == "deepseek2" else _dense_config(meta, reader, shapes)
    raw.update({"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
                "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
                "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")})
    supported = {kind for family in FAMILIES for kind in family.MODEL_TYPES}
    if raw["model_type"] not in supported:
        raise CheckpointError(f"{meta.path}: a DeepSeek-V2 file (expert_gating_func softmax, or none given: "
                              "llama.cpp's default), and this nanoseek has no model_type deepseek_v2; supported: "
                              f"{', '.join(sorted(supported))}")
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise CheckpointError(f"{meta.path}: the GGUF metadata gives a config nanoseek cannot use: {exc}") from exc


def _vocab_size(meta: _Metadata, shapes: dict[str, tuple[int, ...]]) -> int:
    """The metadata's, else the embedding's rows (the token list may be padded or absent)."""
    if meta.model("vocab_size") is not None:
        return meta.model("vocab_size")
    if "token_embd.weight" in shapes:
        return shapes["token_embd.weight"][0]
    return len(meta.need("tokenizer.ggml.tokens"))


def _dense_config(meta: _Metadata, reader: GGUFReader, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """llama / qwen2 (transformers' GGUF_CONFIG_MAPPING for both, plus the head size and Llama 3's scaling)."""
    heads, hidden = meta.need_model("attention.head_count"), meta.need_model("embedding_length")
    raw: dict[str, Any] = {
        "model_type": meta.arch, "vocab_size": _vocab_size(meta, shapes), "hidden_size": hidden,
        "intermediate_size": meta.need_model("feed_forward_length"),
        "num_hidden_layers": meta.need_model("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": meta.model("attention.head_count_kv", heads),
        "max_position_embeddings": meta.need_model("context_length"),
        "rope_theta": float(meta.model("rope.freq_base", 10000.0)),
        "rms_norm_eps": meta.need_model("attention.layer_norm_rms_epsilon"),
        # llama.cpp writes the output projection only when it is not the embedding (transformers' rule too)
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": meta.arch == "llama" and "blk.0.attn_q.bias" in shapes,
    }
    head_dim = meta.model("attention.key_length") or hidden // heads
    if head_dim != hidden // heads:
        raw["head_dim"] = head_dim
    rotated = meta.model("rope.dimension_count", head_dim)
    if rotated != head_dim:
        raise CheckpointError(f"{meta.path}: `{meta.arch}.rope.dimension_count` = {rotated} rotates part of a "
                              f"{head_dim}-dim head; nanoseek's dense models rotate whole heads")
    kind = meta.model("rope.scaling.type", "none")
    if kind != "none":
        raise CheckpointError(f"{meta.path}: `{meta.arch}.rope.scaling.type` = {kind!r} is not supported for "
                              f"{meta.arch} (no scaling, or Llama 3's from rope_freqs.weight)")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        raw["rope_scaling"] = _llama3_scaling(meta, _dequantize(freqs, meta.path), raw["rope_theta"], head_dim)
    return raw


def _llama3_scaling(meta: _Metadata, divisors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any] | None:
    """Llama 3's `rope_scaling` back from llama.cpp's per-frequency divisors: 1 for short wavelengths, `factor`
    for long ones, 1 / ((1 - s) / factor + s) between, with s linear in 1 / wavelength (Llama 3.1 report;
    `generate_extra_tensors`). The line through the in-between points fixes low/high_freq_factor for any original
    length; the fit is checked against every divisor."""
    divisors = divisors.astype(np.float64).reshape(-1)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if divisors.shape != inv_freq.shape:
        raise CheckpointError(f"{meta.path}: rope_freqs.weight has {divisors.size} values; a {head_dim}-dim head "
                              f"has {inv_freq.size} frequencies")
    if np.allclose(divisors, 1.0):
        return None
    factor, inverse_wavelength = float(divisors.max()), inv_freq / (2 * math.pi)
    original = float(meta.model("rope.scaling.original_context_length") or 8192)
    low, high = 1.0, 4.0  # Llama 3.1's, kept when too few frequencies fall between the two bands to fit a line
    between = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if between.sum() >= 2:
        smooth = (1 / divisors[between] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inverse_wavelength[between], smooth, 1)  # s = (L / w - low) / (high - low)
        span = original / slope
        low, high = round(-intercept * span, 6), round(-intercept * span + span, 6)
    smooth = np.clip((original * inverse_wavelength - low) / (high - low), 0.0, 1.0)
    if not np.allclose(1 / ((1 - smooth) / factor + smooth), divisors, rtol=1e-4):
        raise CheckpointError(f"{meta.path}: rope_freqs.weight holds per-frequency RoPE divisors that are not Llama "
                              "3's scaling; nanoseek cannot apply them")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low), "high_freq_factor": float(high),
            "original_max_position_embeddings": int(original)}


def _deepseek_config(meta: _Metadata, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """deepseek2 -> DeepSeek-V3's config (sigmoid gating) or DeepSeek-V2's (softmax), from the keys llama.cpp's
    `DeepseekV2Model.set_gguf_parameters` writes."""
    rope, heads = meta.need_model("rope.dimension_count"), meta.need_model("attention.head_count")
    nextn = meta.model("nextn_predict_layers", 0)
    # newer files describe MLA as MQA over the latent and keep the per-head sizes under *_mla
    key_length = meta.model("attention.key_length_mla") or meta.need_model("attention.key_length")
    gating = meta.model("expert_gating_func", _SOFTMAX)
    if gating not in (_SOFTMAX, _SIGMOID):
        raise CheckpointError(f"{meta.path}: `deepseek2.expert_gating_func` = {gating}; supported: 1 (softmax, "
                              "DeepSeek-V2) and 2 (sigmoid, DeepSeek-V3)")
    groups, used_groups = meta.model("expert_group_count", 1), meta.model("expert_group_used_count", 1)
    raw: dict[str, Any] = {
        "vocab_size": _vocab_size(meta, shapes), "hidden_size": meta.need_model("embedding_length"),
        "intermediate_size": meta.need_model("feed_forward_length"),
        "moe_intermediate_size": meta.need_model("expert_feed_forward_length"),
        "num_hidden_layers": meta.need_model("block_count") - nextn, "num_nextn_predict_layers": nextn,
        "num_attention_heads": heads, "num_key_value_heads": heads,
        "n_routed_experts": meta.need_model("expert_count"), "n_shared_experts": meta.model("expert_shared_count", 0),
        "num_experts_per_tok": meta.need_model("expert_used_count"),
        "first_k_dense_replace": meta.model("leading_dense_block_count", 0),
        "routed_scaling_factor": float(meta.model("expert_weights_scale", 1.0)),
        "norm_topk_prob": bool(meta.model("expert_weights_norm", False)),
        "q_lora_rank": meta.model("attention.q_lora_rank") or None,
        "kv_lora_rank": meta.need_model("attention.kv_lora_rank"), "qk_rope_head_dim": rope,
        "qk_nope_head_dim": key_length - rope,
        "v_head_dim": meta.model("attention.value_length_mla") or meta.need_model("attention.value_length"),
        "max_position_embeddings": meta.need_model("context_length"),
        "rms_norm_eps": meta.need_model("attention.layer_norm_rms_epsilon"),
        "rope_theta": float(meta.model("rope.freq_base", 10000.0)), "rope_scaling": _yarn(meta),
        "n_group": groups, "topk_group": used_groups,
    }
    if gating == _SIGMOID:
        raw.update(model_type="deepseek_v3", scoring_func="sigmoid", topk_method="noaux_tc")
    else:  # V2: device-limited routing where the file has groups, plain top-k otherwise
        raw.update(model_type="deepseek_v2", scoring_func="softmax",
                   topk_method="group_limited_greedy" if groups > 1 else "greedy")
    return raw


def _yarn(meta: _Metadata) -> dict[str, Any] | None:
    kind = meta.model("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "yarn":
        raise CheckpointError(f"{meta.path}: `deepseek2.rope.scaling.type` = {kind!r}; supported: none, yarn")
    yarn = {"type": "yarn", "factor": float(meta.need_model("rope.scaling.factor")),
            "original_max_position_embeddings": meta.need_model("rope.scaling.original_context_length"),
            "beta_fast": float(meta.model("rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": float(meta.model("rope.scaling.yarn_beta_slow", 1.0))}
    log_multiplier = meta.model("rope.scaling.yarn_log_multiplier")
    if log_multiplier:  # DeepSeek's mscale == mscale_all_dim, written as 0.1 * mscale_all_dim
        yarn["mscale"] = yarn["mscale_all_dim"] = round(float(log_multiplier) / 0.1, 6)
    return yarn


# ---- the tensors ----------------------------------------------------------------------------------
Loader = Callable[[], np.ndarray]


class GGUFTensors(Mapping[str, Tensor]):
    """The file's tensors under their HF names; each is dequantised to fp32 when read (an expert alone from its
    stack). A tensor no HF name fits keeps its GGUF name, so that loading reports it as unexpected."""

    def __init__(self, path: Path, loaders: dict[str, Loader]):
        self.path, self._loaders = path, loaders

    def __getitem__(self, name: str) -> Tensor:
        return torch.from_numpy(self._loaders[name]())

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


def _dequantize(tensor: ReaderTensor, path: Path, index: int | None = None) -> np.ndarray:
    """A reader tensor (or its `index`-th slice along the first axis: one expert of a stack) as a writable fp32
    array of its numpy shape, by the gguf package's own dequantisers. Blocks run along the last axis, so a slice
    of the raw data is a whole tensor of its own."""
    data = tensor.data if index is None else tensor.data[index]
    try:
        if tensor.tensor_type == GGMLQuantizationType.F64:
            array = data.astype(np.float32)
        else:
            array = dequantize(data, tensor.tensor_type)
    except NotImplementedError as exc:  # a type this version of the gguf package does not dequantise
        raise CheckpointError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, which the installed gguf "
                              f"package cannot dequantise ({exc})") from exc
    array = np.asarray(array, dtype=np.float32)
    return array if array.flags.writeable else array.copy()  # the file is mapped read-only


def _plan(meta: _Metadata, reader: GGUFReader, config: ModelConfig | DenseConfig) -> dict[str, Loader]:
    """HF name -> loader of the fp32 array, for every tensor of the file."""
    path, tensors = meta.path, {t.name: t for t in reader.tensors}
    deepseek = meta.arch == "deepseek2"
    block = _MLA_LEAVES if deepseek else _DENSE_LEAVES
    loaders: dict[str, Loader] = {}
    for name, tensor in tensors.items():
        if name == "rope_freqs.weight" and meta.arch == "llama":
            continue  # read into the config's rope_scaling
        match = _BLOCK_NAME.fullmatch(name)
        if match is None:
            base, _, suffix = name.rpartition(".")
            hf = next((f"{hf}.{suffix}" for t, hf in GLOBAL_TENSORS.items() if TENSOR_NAMES[t] == base),
                      name)
            loaders[hf] = _plain(tensor, path)
            continue
        layer, leaf, suffix = int(match[1]), match[2], match[3]
        prefix = f"model.layers.{layer}."
        if leaf in block:
            loaders[prefix + f"{block[leaf]}.{suffix}"] = _plain_or_unpermuted(tensor, leaf, meta, config)
        elif leaf in _EXPERT_LEAVES and deepseek:  # [E, out, in] -> one tensor per expert, as HF stores them
            for expert in range(tensor.data.shape[0]):
                loaders[prefix + f"mlp.experts.{expert}.{_EXPERT_LEAVES[leaf]}.{suffix}"] = \
                    (lambda t=tensor, e=expert: _dequantize(t, path, e))
        elif leaf == block_leaf(T.FFN_EXP_PROBS_B) and deepseek:
            loaders[prefix + "mlp.gate.e_score_correction_bias"] = _plain(tensor, path)
        elif leaf == block_leaf(T.ATTN_K_B) and f"blk.{layer}.{block_leaf(T.ATTN_V_B)}.{suffix}" in tensors:
            value = tensors[f"blk.{layer}.{block_leaf(T.ATTN_V_B)}.{suffix}"]
            loaders[prefix + f"self_attn.kv_b_proj.{suffix}"] = _joined_kv_b(tensor, value, path)
        elif leaf == block_leaf(T.ATTN_V_B) and f"blk.{layer}.{block_leaf(T.ATTN_K_B)}.{suffix}" in tensors:
            continue  # joined with attn_k_b above
        else:
            loaders[name] = _plain(tensor, path)
    return loaders


def block_leaf(kind: MODEL_TENSOR) -> str:
    """`blk.{bid}.attn_q` -> `attn_q`."""
    return TENSOR_NAMES[kind].split("{bid}.", 1)[1]


def _leaf_names(table: dict[MODEL_TENSOR, str]) -> dict[str, str]:
    return {block_leaf(kind): hf for kind, hf in table.items()}


_DENSE_LEAVES, _MLA_LEAVES, _EXPERT_LEAVES = (_leaf_names(table) for table in
                                              (DENSE_BLOCK_TENSORS, MLA_BLOCK_TENSORS, EXPERT_TENSORS))


def _plain(tensor: ReaderTensor, path: Path) -> Loader:
    return lambda: _dequantize(tensor, path)


def _plain_or_unpermuted(tensor: ReaderTensor, leaf: str, meta: _Metadata, config: ModelConfig | DenseConfig) -> Loader:
    """llama's q and k rows back in HF order: the converter stored each head's rotate-half halves interleaved
    (`LlamaModel.permute`, per kv head for k); transformers' `_reverse_permute_weights` undoes it the same way."""
    if meta.arch != "llama" or leaf not in (block_leaf(T.ATTN_Q), block_leaf(T.ATTN_K)):
        return _plain(tensor, meta.path)
    heads = config.num_attention_heads if leaf == block_leaf(T.ATTN_Q) else config.num_key_value_heads

    def load() -> np.ndarray:
        array = _dequantize(tensor, meta.path)
        if array.shape[0] % (2 * heads):
            raise CheckpointError(f"{meta.path}: tensor {tensor.name} has {array.shape[0]} rows, not a multiple of "
                                  f"2 x {heads} heads")
        pairs = array.reshape(heads, array.shape[0] // heads // 2, 2, *array.shape[1:])
        return np.ascontiguousarray(pairs.swapaxes(1, 2)).reshape(array.shape)

    return load


def _joined_kv_b(key: ReaderTensor, value: ReaderTensor, path: Path) -> Loader:
    """MLA's kv_b_proj [heads * (nope + v), kv_lora] from llama.cpp's split: k_b [heads, kv_lora, nope] (stored
    transposed, for the absorbed product) and v_b [heads, v, kv_lora] (`DeepseekV2Model.modify_tensors`)."""
    def load() -> np.ndarray:
        k_b, v_b = _dequantize(key, path), _dequantize(value, path)
        if k_b.ndim != 3 or v_b.ndim != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != v_b.shape[2]:
            raise CheckpointError(f"{path}: {key.name} {list(k_b.shape)} and {value.name} {list(v_b.shape)} are not "
                                  "MLA's split kv_b ([heads, kv_lora, nope] and [heads, v, kv_lora])")
        joined = np.concatenate((k_b.transpose(0, 2, 1), v_b), axis=1)
        return np.ascontiguousarray(joined).reshape(-1, k_b.shape[1])

    return load


# ---- the tokenizer and the generation defaults ----------------------------------------------------
def _tokenizer(meta: _Metadata) -> Tokenizer | None:
    """The tokenizer of `tokenizer.ggml.*` as transformers' GGUF loader builds it (`gguf_tokenizer_mapping.py`):
    byte-level BPE (`gpt2`: Llama 3, Qwen2, DeepSeek) or SentencePiece BPE (`llama`: Llama 2, Mistral, TinyLlama);
    control tokens special, user-defined ones added whole, BOS/EOS added as `add_bos_token`/`add_eos_token` say
    (a SentencePiece vocabulary adds BOS unless the file says not, as llama.cpp does), the chat template."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind not in _TOKENIZER_BUILDERS:
        raise CheckpointError(f"{meta.path}: tokenizer.ggml.model = {kind!r} is not supported; supported: gpt2 "
                              "(byte-level BPE: Llama 3, Qwen2, DeepSeek), llama (SentencePiece BPE: Llama 2, "
                              "Mistral); pass a tokenizer of your own")
    tokens = meta.need("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or []
    backend, spelled = _TOKENIZER_BUILDERS[kind](meta, tokens, types)
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, token_type in enumerate(types) if token_type == _CONTROL])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, token_type in enumerate(types) if token_type == _USER_DEFINED])
    special = {name: spelled[i] for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"),
                                                  ("unk_token", "unknown"))
               if isinstance(i := meta.get(f"tokenizer.ggml.{key}_token_id"), int) and 0 <= i < len(tokens)}
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                              "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
                              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False))}
    if (post_processor := _post_processor(config, backend)) is not None:
        backend.post_processor = post_processor
    template = _chat_templates(meta)
    if template is not None:
        config["chat_template"] = template
    return Tokenizer(backend, config)


def _byte_level(meta: _Metadata, tokens: list[str], types: list[int]) -> tuple[_RustTokenizer, list[str]]:
    """tokenizer.ggml.model = gpt2: the file's tokens (respelled in the byte alphabet) and merges, the split of
    `tokenizer.ggml.pre`."""
    merges = meta.need("tokenizer.ggml.merges")
    spelled = _respelled(tokens, types)
    vocab = {token: index for index, token in enumerate(spelled)}
    backend = _RustTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                        fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(meta)
    backend.decoder = decoders.ByteLevel()
    return backend, spelled


def _sentencepiece(meta: _Metadata, tokens: list[str], types: list[int]) -> tuple[_RustTokenizer, list[str]]:
    """tokenizer.ggml.model = llama: SentencePiece BPE over pieces spelled with U+2581 for a space, `<0xXX>`
    tokens for bytes no piece covers, a space before the text when `tokenizer.ggml.add_space_prefix` (default
    true) says, and merges from the file or else from the scores (transformers' `generate_merges`)."""
    given = meta.get("tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in given] if given else \
        _merges_from_scores(tokens, meta.need("tokenizer.ggml.scores"))
    unknown = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unknown] if isinstance(unknown, int) and 0 <= unknown < len(tokens) else None
    backend = _RustTokenizer(models.BPE(vocab={token: index for index, token in enumerate(tokens)}, merges=merges,
                                        unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first" if prefix else "never",
                                                     split=False)
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return backend, list(tokens)


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """A SentencePiece vocabulary's merges: each way of cutting a piece into two pieces, ranked by the whole
    piece's score (highest first), then by the longer left and right parts; cuts of one piece in the order of
    their parts' ids (llama.cpp's SPM tokenizer joins the best-scoring adjacent pair first)."""
    ids = {token: index for index, token in enumerate(tokens)}
    ranked = []
    for token, score in zip(tokens, scores, strict=True):
        cuts = [(token[:at], token[at:]) for at in range(1, len(token)) if token[:at] in ids and token[at:] in ids]
        cuts.sort(key=lambda cut: (ids[cut[0]], ids[cut[1]]))
        ranked += [(-score, -len(left), -len(right), left, right) for left, right in cuts]
    ranked.sort(key=lambda entry: entry[:3])  # stable: ties keep the order above
    return [(left, right) for *_, left, right in ranked]


_TOKENIZER_BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece}
_SPACE = "\u2581"  # SentencePiece's visible space


def _respelled(tokens: list[str], types: list[int]) -> list[str]:
    """Ordinary tokens in the byte-level alphabet (a converter may have written one as plain text, as transformers
    also assumes); control and user-defined tokens stay as written, being matched whole in the text."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spelled = list(tokens)
    for index, token in enumerate(tokens):
        kind = types[index] if index < len(types) else 1
        if kind not in (_CONTROL, _USER_DEFINED) and not set(token) <= alphabet:
            spelled[index] = token.encode().decode("latin-1").translate(_BYTE_ALPHABET)
    return spelled


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table (printable bytes stand for themselves, the rest from U+0100 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte], extra = chr(256 + extra), extra + 1
    return table


_BYTE_ALPHABET = _byte_alphabet()


def _pre_tokenizer(meta: _Metadata) -> pre_tokenizers.PreTokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        if pre not in _GPT2_PRE:
            warnings.warn(f"{meta.path}: tokenizer.ggml.pre = {pre!r} is not known to nanoseek; splitting the text "
                          "as GPT-2 does (as transformers would), which may tokenize some text differently from "
                          f"the model's own tokenizer (known: {', '.join(PRE_TOKENIZER_SPLITS)})", stacklevel=3)
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([*(pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _post_processor(config: dict[str, Any], backend: _RustTokenizer) -> processors.PostProcessor | None:
    bos = config.get("bos_token") if config["add_bos_token"] else None
    eos = config.get("eos_token") if config["add_eos_token"] else None
    if bos is None and eos is None:
        return None
    ends = [token for token in (bos, eos) if token is not None]
    single = " ".join([*(["$A"] if bos is None else [bos, "$A"]), *([eos] if eos else [])])
    pair = single + " " + single.replace("$A", "$B")
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=[(token, backend.token_to_id(token)) for token in ends])


def _chat_templates(meta: _Metadata) -> str | dict[str, str] | None:
    """`tokenizer.chat_template`, with any named ones (`tokenizer.chat_template.{name}`) beside it."""
    main = meta.get("tokenizer.chat_template")
    named = {name: meta.get(f"tokenizer.chat_template.{name}") for name in meta.get("tokenizer.chat_templates") or []}
    named = {name: template for name, template in named.items() if template}
    if not named:
        return main
    return {**({"default": main} if main else {}), **named}


def _generation(meta: _Metadata) -> dict[str, Any]:
    """generation_config.json's fields from the metadata: BOS, every end token (EOS, end of turn, end of message)
    and the sampling settings the file recommends (`general.sampling.*`)."""
    generation: dict[str, Any] = {}
    if (bos := meta.get("tokenizer.ggml.bos_token_id")) is not None:
        generation["bos_token_id"] = bos
    ends = [i for key in ("eos", "eot", "eom") if (i := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None]
    ends = list(dict.fromkeys(ends))
    if ends:
        generation["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    for key, field in SAMPLING_KEYS.items():
        if (value := meta.get(f"general.sampling.{key}")) is not None:
            generation[field] = value
    return generation
