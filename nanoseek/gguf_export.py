"""GGUF files out: a model of either family, and its tokenizer and chat template, as one llama.cpp file that
llama.cpp and Ollama run (`nanoseek export-gguf CKPT OUT.gguf --type f32|f16|bf16|q8_0|q4_0`).

What is written is what llama.cpp's `convert_hf_to_gguf.py` writes for the same Hugging Face checkpoint, and so
exactly what `gguf_files` reads back (its tables of tensor names are shared from there):

- llama (`LlamaModel`): q and k rows permuted so that llama.cpp's adjacent-pair RoPE computes HF's rotate-half
  one (`LlamaModel.permute`: k by its kv heads), Llama 3's RoPE scaling as a `rope_freqs.weight` tensor of
  per-frequency divisors (`generate_extra_tensors`); qwen2 (`Qwen2Model`) as it is, its q/k/v biases kept;
- deepseek2 (`DeepseekV2Model`, DeepSeek-V3 and V2): experts stacked into [E, out, in] `ffn_*_exps`, MLA's
  kv_b_proj split into `attn_k_b` (transposed) and `attn_v_b` with MQA over the latent in the metadata
  (`head_count_kv` 1, key/value lengths of the latent, the per-head ones as `*_mla`), the V3 router bias as
  `exp_probs_b.bias`, `expert_gating_func` sigmoid (V3) or softmax (V2), YaRN's mscale as
  `yarn_log_multiplier` = 0.1 * mscale_all_dim; the MTP modules are dropped, as that converter drops them
  (`skip_mtp`: llama.cpp's deepseek2 graph has no MTP), so the file is the main model;
- a head tied to the embedding is not written (llama.cpp then uses `token_embd` as the output);
- tensor types follow `ModelBase.prepare_tensors`: 1-D tensors, norms, biases and the router stay F32, the
  other matrices take the file's type, and one whose rows are not whole blocks (32 values for Q8_0 / Q4_0)
  falls back to F16. For q4_0 the output matrix (the embedding when tied) is Q8_0: llama.cpp's `llama-quantize`
  gives it Q6_K, which the gguf package cannot write, and Q8_0 is what it falls back to;
- the tokenizer as `LlamaModel.set_vocab` -> `_set_vocab_gpt2` writes a byte-level BPE: `tokenizer.ggml.model`
  gpt2, the pre-tokenizer named by the llama.cpp `tokenizer.ggml.pre` whose split is the tokenizer's own
  ("gpt-2" for GPT-2's ByteLevel regex, which nanoseek's `train_tokenizer` uses; "llama-bpe", "qwen2",
  "deepseek-v3" for those models' splits), tokens padded to the model's vocab_size with `[PAD{i}]` (UNUSED),
  control (special) and user-defined (added) token types, merges, BOS/EOS/PAD ids, `add_bos_token` /
  `add_eos_token` as the tokenizer's post-processor adds them, the chat template (`gguf.SpecialVocab`), and the
  generation config's sampling defaults as `general.sampling.*`.

The file is written beside the target under a temporary name and renamed into place, so a failed export leaves
no half-written file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.constants import MODEL_TENSOR, TENSOR_NAMES, ExpertGatingFuncType, RopeScalingType, TokenType
from gguf.quants import quantize

from .checkpoint import load_model, load_tokenizer
from .config import DenseConfig, ModelConfig
from .gguf_files import (
    DENSE_BLOCK_TENSORS,
    EXPERT_TENSORS,
    GGUF_SUFFIX,
    GLOBAL_TENSORS,
    MLA_BLOCK_TENSORS,
    PRE_TOKENIZER_SPLITS,
    SAMPLING_KEYS,
    block_leaf,
)
from .model import LanguageModel
from .model.rope import inverse_frequencies
from .tokenizer import Tokenizer

__all__ = ["DEFAULT_TYPE", "FILE_TYPES", "ExportError", "ExportSummary", "add_arguments", "check_target",
           "export_gguf", "gguf_architecture", "run", "tensor_type"]

Q = GGMLQuantizationType
# --type -> (general.file_type, the type of the matrices); f16 is the converter's default for fp32 weights
FILE_TYPES: dict[str, tuple[LlamaFileType, GGMLQuantizationType]] = {
    "f32": (LlamaFileType.ALL_F32, Q.F32), "f16": (LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, Q.BF16), "q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, Q.Q4_0)}
DEFAULT_TYPE = "f16"
T = MODEL_TENSOR
_GLOBAL = {hf: TENSOR_NAMES[kind] for kind, hf in GLOBAL_TENSORS.items()}  # HF module -> GGUF tensor
_DENSE = {hf: block_leaf(kind) for kind, hf in DENSE_BLOCK_TENSORS.items()}  # HF leaf module -> GGUF leaf
_MLA = {hf: block_leaf(kind) for kind, hf in MLA_BLOCK_TENSORS.items()}
_EXPERT = {hf: block_leaf(kind) for kind, hf in EXPERT_TENSORS.items()}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_NAME = re.compile(r"mlp\.experts\.(\d+)\.(\w+)\.weight")
_ROUTER_LEAF = block_leaf(T.FFN_GATE_INP)
# the first name of each split in gguf_files' table is the one llama.cpp's converter writes for that model
_PRE_NAMES = {splits: name for name, splits in reversed(PRE_TOKENIZER_SPLITS.items())}
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


class ExportError(ValueError):
    """The model, tokenizer or target cannot be written as a GGUF file; the message says why."""


class ExportSummary(NamedTuple):
    path: Path
    architecture: str  # llama, qwen2 or deepseek2
    file_type: str  # the --type
    tensor_types: dict[str, str]  # GGUF tensor name -> its type (F32, F16, Q8_0, ...)
    bytes: int


def export_gguf(model: LanguageModel, tokenizer: Tokenizer | None, path: str | os.PathLike,
                file_type: str = DEFAULT_TYPE, *, name: str | None = None, force: bool = False) -> ExportSummary:
    """Write `model` (and `tokenizer`, unless None: weights only) to the GGUF file `path` with its matrices in
    `file_type` (f32, f16, bf16, q8_0, q4_0); ExportError naming the problem otherwise. An existing file is
    replaced only with `force`."""
    if file_type not in FILE_TYPES:
        raise ExportError(f"unknown GGUF type {file_type!r}; supported: {', '.join(FILE_TYPES)}")
    path = Path(path)
    check_target(path, force)
    config = model.config
    arch = gguf_architecture(config)
    ftype, matrix_type = FILE_TYPES[file_type]
    writer = GGUFWriter(None, arch)
    writer.add_type("model")
    writer.add_name(name or "nanoseek")
    writer.add_file_type(ftype)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    if arch == "deepseek2":
        _add_deepseek_metadata(writer, config)
    else:
        _add_dense_metadata(writer, config)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer, config)
    _add_sampling(writer, getattr(model, "generation_config", None) or {})
    tensors = dict(_gguf_tensors(model, arch))
    has_output = TENSOR_NAMES[T.OUTPUT] + ".weight" in tensors
    types = {}
    for tensor_name, array in tensors.items():
        kind = tensor_type(tensor_name, array, matrix_type, has_output)
        writer.add_tensor(tensor_name, quantize(array, kind), raw_dtype=kind)
        types[tensor_name] = kind.name
    _write_atomically(writer, path)
    return ExportSummary(path, arch, file_type, types, path.stat().st_size)


def check_target(path: Path, force: bool) -> None:
    """The output must be a .gguf file name (what nanoseek's own loaders recognise), and new unless `force`."""
    if path.suffix.lower() != GGUF_SUFFIX:
        raise ExportError(f"{path}: a GGUF file name must end in {GGUF_SUFFIX}")
    if path.is_dir():
        raise ExportError(f"{path}: is a directory; give the .gguf file to write")
    if path.exists() and not force:
        raise ExportError(f"{path}: already exists; pass --force (force=True) to overwrite it")


def gguf_architecture(config: ModelConfig | DenseConfig) -> str:
    """llama.cpp's architecture for the config, after checking llama.cpp can run it as nanoseek does."""
    if isinstance(config, DenseConfig):
        if config.model_type == "qwen2" and (config.rope_scaling or config.attention_bias):
            raise ExportError("a qwen2 model with rope_scaling or an o_proj bias (attention_bias) has no llama.cpp "
                              "qwen2 equivalent; llama.cpp's qwen2 has neither")
        return config.model_type
    if config.index_cache_dim:
        raise ExportError("a DeepSeek-V3.2 model (model_type deepseek_v32): llama.cpp's deepseek2 architecture, the "
                          "one this export writes, has no sparse-attention indexer, so the file would attend densely "
                          f"and be another model past index_topk ({config.index_topk}) tokens")
    if config.attention_bias:
        raise ExportError("a DeepSeek model with attention_bias has no llama.cpp deepseek2 equivalent (its MLA has "
                          "no biases)")
    if config.rope_scaling is not None:
        _check_yarn(config)
    if config.topk_method == "group_limited_greedy" and config.topk_group < config.n_group:
        warnings.warn("DeepSeek-V2's device-limited routing scores a group by its best expert; llama.cpp scores one "
                      "by its best two (DeepSeek-V3's rule), so it may route some tokens differently from nanoseek",
                      stacklevel=3)
    if not config.q_lora_rank and config.num_hidden_layers not in (26, 27):
        warnings.warn(f"a DeepSeek model without q_lora_rank: llama.cpp's deepseek2 builds one (its `is_lite`) only "
                      f"with 26 or 27 layers, DeepSeek-V2-Lite's, so this {config.num_hidden_layers}-layer file will "
                      "not load there (nanoseek reads it)", stacklevel=3)
    return "deepseek2"


def _check_yarn(config: ModelConfig) -> None:
    """llama.cpp's deepseek2 takes YaRN's cos/sin factor as 1 and scales the softmax by mscale_all_dim alone
    (`yarn_log_multiplier`), which is DeepSeek's case mscale == mscale_all_dim; ramps are truncated."""
    rs = config.rope_scaling
    if rs.get("type") != "yarn":
        raise ExportError(f"rope_scaling type {rs.get('type')!r} has no deepseek2 equivalent; supported: yarn")
    factor = inverse_frequencies(config)[1]
    if not math.isclose(factor, 1.0, abs_tol=1e-6) or not rs.get("mscale_all_dim") or not rs.get("truncate", True):
        raise ExportError(f"YaRN with mscale {rs.get('mscale')!r}, mscale_all_dim {rs.get('mscale_all_dim')!r} "
                          f"(cos/sin factor {factor:.6g}){'' if rs.get('truncate', True) else ', truncate false'} "
                          "cannot be written: llama.cpp's deepseek2 supports only mscale == mscale_all_dim "
                          "(a cos/sin factor of 1) with truncated ramps, as DeepSeek's releases use")


# ---- metadata ----------------------------------------------------------------------------------
def _add_dense_metadata(writer: GGUFWriter, config: DenseConfig) -> None:
    """`TextModel.set_gguf_parameters` and `LlamaModel`'s additions (vocab size, RoPE dimensions)."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)  # the embedding's rows, which the token list is padded to
    if config.head_size != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(config.head_size)
        writer.add_value_length(config.head_size)
    if config.model_type == "llama":
        writer.add_rope_dimension_count(config.head_size)
    if config.rope_scaling:  # Llama 3: the divisors are the rope_freqs tensor; the original length helps read back
        writer.add_rope_scaling_orig_ctx_len(int(config.rope_scaling["original_max_position_embeddings"]))


def _add_deepseek_metadata(writer: GGUFWriter, config: ModelConfig) -> None:
    """`DeepseekV2Model.set_gguf_parameters`: MLA as MQA over the latent, the MoE and routing keys, YaRN."""
    for key, value in (("context_length", config.max_position_embeddings), ("embedding_length", config.hidden_size),
                       ("block_count", config.num_hidden_layers), ("feed_forward_length", config.intermediate_size),
                       ("head_count", config.num_attention_heads), ("head_count_kv", 1),
                       ("vocab_size", config.vocab_size), ("leading_dense_block_count", config.first_k_dense_replace),
                       ("kv_lora_rank", config.kv_lora_rank), ("key_length", config.kv_cache_dim),
                       ("value_length", config.kv_lora_rank), ("key_length_mla", config.qk_head_dim),
                       ("value_length_mla", config.v_head_dim), ("rope_dimension_count", config.qk_rope_head_dim),
                       ("expert_feed_forward_length", config.moe_intermediate_size),
                       ("expert_count", config.n_routed_experts), ("expert_shared_count", config.n_shared_experts),
                       ("expert_used_count", config.num_experts_per_tok)):
        getattr(writer, f"add_{key}")(value)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_expert_weights_scale(config.routed_scaling_factor)
    if config.norm_topk_prob:
        writer.add_expert_weights_norm(True)
    sigmoid = config.scoring_func == "sigmoid"
    writer.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if sigmoid else ExpertGatingFuncType.SOFTMAX)
    if config.q_lora_rank:
        writer.add_q_lora_rank(config.q_lora_rank)
    # groups only where the routing uses them (V3 always; V2's greedy ignores any it is given)
    if config.topk_method in ("noaux_tc", "group_limited_greedy"):
        writer.add_expert_group_count(config.n_group)
        writer.add_expert_group_used_count(config.topk_group)
    rs = config.rope_scaling
    if rs is not None:
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rs["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        writer.add_rope_scaling_yarn_log_mul(0.1 * float(rs["mscale_all_dim"]))
        # llama.cpp's defaults are YaRN's 32 and 1: written only when they differ
        if float(rs.get("beta_fast") or 32) != 32:
            writer.add_rope_scaling_yarn_beta_fast(float(rs["beta_fast"]))
        if float(rs.get("beta_slow") or 1) != 1:
            writer.add_rope_scaling_yarn_beta_slow(float(rs["beta_slow"]))


def _add_sampling(writer: GGUFWriter, generation: dict[str, Any]) -> None:
    """The generation config's sampling defaults as `general.sampling.*`, which llama.cpp applies."""
    for key, field in SAMPLING_KEYS.items():
        value = generation.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            getattr(writer, f"add_sampling_{key}")(int(value) if key == "top_k" else float(value))


# ---- the tokenizer -----------------------------------------------------------------------------
def _add_tokenizer(writer: GGUFWriter, tokenizer: Tokenizer, config: ModelConfig | DenseConfig) -> None:
    """`_set_vocab_gpt2` and `gguf.SpecialVocab.add_to_gguf`: the byte-level BPE, its special ids and flags."""
    state = json.loads(tokenizer.backend.to_str())
    model = state.get("model") or {}
    if model.get("type") != "BPE" or (state.get("decoder") or {}).get("type") != "ByteLevel" or \
            model.get("byte_fallback"):
        raise ExportError("the tokenizer is not a byte-level BPE (a BPE model with a ByteLevel decoder): llama.cpp's "
                          "gpt2 tokenizer needs one; export with --no-tokenizer (tokenizer=None) for the weights alone")
    if state.get("normalizer") is not None and (state["normalizer"] or {}).get("type") != "NFC":
        warnings.warn(f"the tokenizer's normalizer ({state['normalizer'].get('type')}) is not written: llama.cpp "
                      "applies none to a gpt2 tokenizer", stacklevel=3)
    tokens, types = _tokens(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_name(state.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []])
    bos, eos = _special_ids(tokenizer, config, len(tokens))
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    if (pad := tokenizer.pad_token_id) is not None:
        writer.add_pad_token_id(pad)
    if (unk := tokenizer.token_id(tokenizer.special_token("unk_token"))) is not None:
        writer.add_unk_token_id(unk)
    add_bos, add_eos = _added_ends(tokenizer, bos, eos)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = tokenizer.config.get("chat_template")
    if isinstance(template, dict):  # named templates, "default" the main one
        template = [{"name": key, "template": value} for key, value in template.items()]
    if template:
        writer.add_chat_template(template)


def _pre_name(pre: dict[str, Any] | None) -> str:
    """The `tokenizer.ggml.pre` whose split is this pre-tokenizer's: GPT-2's ByteLevel regex is llama.cpp's
    "gpt-2"; a Sequence of Splits then a regex-free ByteLevel is the model whose regexes it holds."""
    pre = pre or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and parts and parts[-1].get("type") == "ByteLevel" and \
            not parts[-1].get("use_regex", True) and not parts[-1].get("add_prefix_space"):
        splits = parts[:-1]
        if all(p.get("type") == "Split" and p.get("behavior") == "Isolated" and not p.get("invert") and
               "Regex" in (p.get("pattern") or {}) for p in splits):
            regexes = tuple(p["pattern"]["Regex"] for p in splits)
            if regexes == (_GPT2_REGEX,):
                return "gpt-2"
            if regexes in _PRE_NAMES:
                return _PRE_NAMES[regexes]
    raise ExportError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) splits text in no way llama.cpp "
                      f"knows; supported: GPT-2's ByteLevel regex (gpt-2) and the splits of "
                      f"{', '.join(dict.fromkeys(_PRE_NAMES.values()))}")


def _tokens(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token up to the model's vocab_size (`get_vocab_base`): missing ids as `[PAD{i}]` (UNUSED),
    special added tokens CONTROL, other added ones USER_DEFINED, the rest NORMAL."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    by_id = {index: token for token, index in vocab.items()}
    if by_id and max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has token ids up to {max(by_id)}, beyond the model's vocab_size "
                          f"{vocab_size} (the embedding's rows)")
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            types.append(TokenType.NORMAL if index not in added else
                         TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
    return tokens, [int(t) for t in types]


def _special_ids(tokenizer: Tokenizer, config: ModelConfig | DenseConfig, count: int) -> tuple[int | None, ...]:
    """BOS and EOS: the tokenizer's tokens, else the model config's ids (the first of several EOS ids)."""
    ids = []
    for own, fallback in ((tokenizer.bos_token_id, config.bos_token_id), (tokenizer.eos_token_id, config.eos_token_id)):
        value = own if own is not None else fallback
        value = value[0] if isinstance(value, list) and value else value
        ids.append(value if isinstance(value, int) and 0 <= value < count else None)
    return tuple(ids)


def _added_ends(tokenizer: Tokenizer, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS (what `add_bos_token` / `add_eos_token` tell llama.cpp); ExportError when
    the post-processor adds anything else, which llama.cpp could not reproduce."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) + add_bos and full[-1] == eos
    if full != [bos] * add_bos + plain + [eos] * add_eos:
        raise ExportError(f"the tokenizer's post-processor turns {plain} into {full}; llama.cpp can only add BOS "
                          "and EOS")
    return add_bos, add_eos


# ---- the tensors -------------------------------------------------------------------------------
def tensor_type(name: str, array: np.ndarray, matrix_type: GGMLQuantizationType,
                has_output: bool) -> GGMLQuantizationType:
    """A tensor's type in a file whose matrices are `matrix_type` (`ModelBase.prepare_tensors`)."""
    leaf = name.rsplit(".", 1)[0].split(".", 2)[-1]
    if array.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or leaf == _ROUTER_LEAF:
        return Q.F32
    output = TENSOR_NAMES[T.OUTPUT] + ".weight"
    if matrix_type == Q.Q4_0 and (name == output or (not has_output and name == TENSOR_NAMES[T.TOKEN_EMBD] +
                                                     ".weight")):
        matrix_type = Q.Q8_0
    if array.shape[-1] % GGML_QUANT_SIZES[matrix_type][0]:
        return Q.F16  # the converter's fallback for rows that are not whole blocks
    return matrix_type


def _gguf_tensors(model: LanguageModel, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array in numpy = GGUF-reversed layout) for every tensor the file holds."""
    config = model.config
    slots = {name: slot for name, slot in model.checkpoint_slots().items() if slot.saved}
    read = {name: (lambda slot=slot: slot.read().detach().to("cpu", torch.float32).numpy()) for name, slot in
            slots.items()}
    done: set[str] = set()
    for name in slots:
        match = _LAYER.fullmatch(name)
        if match is None:
            base, _, suffix = name.rpartition(".")
            if base not in _GLOBAL:
                raise ExportError(f"tensor {name} has no GGUF name")
            yield f"{_GLOBAL[base]}.{suffix}", read[name]()
            continue
        layer, rest = int(match[1]), match[2]
        if layer >= config.num_hidden_layers or name in done:
            continue  # an MTP module (dropped as llama.cpp's converter drops it), or an expert already stacked
        if arch == "deepseek2":
            yield from _deepseek_tensors(config, layer, rest, read, done)
        else:
            yield from _dense_tensor(config, layer, rest, read[name]())
    if arch == "llama" and config.rope_scaling:
        yield TENSOR_NAMES[T.ROPE_FREQS] + ".weight", _llama3_divisors(config)


def _block_name(table: dict[str, str], layer: int, rest: str) -> str:
    module, _, suffix = rest.rpartition(".")
    if module not in table:
        raise ExportError(f"tensor model.layers.{layer}.{rest} has no GGUF name")
    return f"blk.{layer}.{table[module]}.{suffix}"


def _dense_tensor(config: DenseConfig, layer: int, rest: str, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """llama's q and k (weights and biases) permuted as `LlamaModel.permute`; everything else as it is."""
    name = _block_name(_DENSE, layer, rest)
    if config.model_type == "llama" and rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.")):
        heads = config.num_attention_heads if rest.startswith("self_attn.q_proj.") else config.num_key_value_heads
        array = _pairs_adjacent(array, heads)
    yield name, array


def _pairs_adjacent(array: np.ndarray, groups: int) -> np.ndarray:
    """Within each of `groups` row groups, the rotate-half halves interleaved: row i of the first half then row
    i of the second, so that adjacent-pair RoPE rotates what rotate-half RoPE rotated (`LlamaModel.permute`)."""
    rows = array.shape[0]
    return np.ascontiguousarray(array.reshape(groups, 2, rows // groups // 2, *array.shape[1:]).swapaxes(1, 2)) \
        .reshape(array.shape)


def _deepseek_tensors(config: ModelConfig, layer: int, rest: str, read: dict, done: set[str]
                      ) -> Iterator[tuple[str, np.ndarray]]:
    """`DeepseekV2Model.modify_tensors` for one HF tensor of a decoder layer."""
    prefix = f"model.layers.{layer}."
    if (expert := _EXPERT_NAME.fullmatch(rest)) is not None:  # all experts of this projection, stacked
        names = [f"{prefix}mlp.experts.{e}.{expert[2]}.weight" for e in range(config.n_routed_experts)]
        done.update(names)
        yield f"blk.{layer}.{_EXPERT[expert[2]]}.weight", np.stack([read[n]() for n in names])
    elif rest == "mlp.gate.e_score_correction_bias":  # the converter's `e_score_correction.bias`
        yield f"blk.{layer}.{block_leaf(T.FFN_EXP_PROBS_B)}.bias", read[prefix + rest]()
    elif rest == "self_attn.kv_b_proj.weight":  # [heads * (nope + v), kv_lora] -> k_b^T and v_b per head
        kv_b = read[prefix + rest]().reshape(config.num_attention_heads, -1, config.kv_lora_rank)
        k_b, v_b = kv_b[:, :config.qk_nope_head_dim], kv_b[:, config.qk_nope_head_dim:]
        yield f"blk.{layer}.{block_leaf(T.ATTN_K_B)}.weight", np.ascontiguousarray(k_b.transpose(0, 2, 1))
        yield f"blk.{layer}.{block_leaf(T.ATTN_V_B)}.weight", np.ascontiguousarray(v_b)
    else:
        yield _block_name(_MLA, layer, rest), _interleaved_rope(config, rest, read[prefix + rest]())


def _interleaved_rope(config: ModelConfig, rest: str, array: np.ndarray) -> np.ndarray:
    """llama.cpp's deepseek2 rotates adjacent pairs, as DeepSeek's weights are laid out (`rope_interleave`); a
    model trained with rotate-half RoPE (`rope_interleave` false) gets its rope rows of q and k_pe interleaved."""
    if config.rope_interleave or rest not in ("self_attn.q_proj.weight", "self_attn.q_b_proj.weight",
                                              "self_attn.kv_a_proj_with_mqa.weight"):
        return array
    rope = config.qk_rope_head_dim
    if rest == "self_attn.kv_a_proj_with_mqa.weight":  # [kv_lora + rope, d]: the last rope rows are k_pe
        return np.concatenate((array[:-rope], _pairs_adjacent(array[-rope:], 1)))
    heads = array.reshape(config.num_attention_heads, config.qk_head_dim, -1)  # per head: nope rows, rope rows
    rotated = np.stack([_pairs_adjacent(head[-rope:], 1) for head in heads])
    return np.concatenate((heads[:, :-rope], rotated), axis=1).reshape(array.shape)


def _llama3_divisors(config: DenseConfig) -> np.ndarray:
    """Llama 3's per-frequency RoPE divisors (`LlamaModel.generate_extra_tensors`): 1 for wavelengths below
    original / high_freq_factor, `factor` above original / low_freq_factor, 1 / ((1 - s) / factor + s) between,
    s linear in original / wavelength (Llama 3.1 report)."""
    rs, dim = config.rope_scaling, config.head_size
    factor, low, high = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    original = float(rs["original_max_position_embeddings"])
    wavelength = 2 * math.pi * config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)


def _write_atomically(writer: GGUFWriter, path: Path) -> None:
    """Header, metadata and tensors to a temporary file beside `path`, renamed into place once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)


# ---- the command -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory (or .gguf file) to export")
    parser.add_argument("out", help="the .gguf file to write")
    parser.add_argument("--type", choices=list(FILE_TYPES), default=DEFAULT_TYPE,
                        help=f"type of the matrices (default {DEFAULT_TYPE}, as llama.cpp's converter); norms, "
                             "biases and routers stay f32")
    parser.add_argument("--name", help="general.name (default: the checkpoint's directory name)")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="write the weights alone (llama.cpp and Ollama then cannot run the file)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def run(args: argparse.Namespace) -> int:
    """`nanoseek export-gguf CKPT OUT.gguf`: load, check, write; one summary line."""
    out, source = Path(args.out), Path(args.checkpoint)
    check_target(out, args.force)  # before the (slow) load
    model = load_model(source, device="cpu")
    tokenizer = None if args.no_tokenizer else load_tokenizer(source)
    if tokenizer is None and not args.no_tokenizer:
        raise ExportError(f"{source}: has no tokenizer (tokenizer.json), and llama.cpp and Ollama need one in the "
                          "file; pass --no-tokenizer to write the weights alone")
    if args.no_tokenizer:
        print("nanoseek export-gguf: writing the weights alone: llama.cpp and Ollama need a tokenizer to run the "
              "file", file=sys.stderr)
    summary = export_gguf(model, tokenizer, out, args.type, name=args.name or source.stem, force=args.force)
    counts = Counter(summary.tensor_types.values())
    print(f"wrote {summary.path} ({summary.architecture}, {summary.file_type}: {len(summary.tensor_types)} tensors, "
          f"{', '.join(f'{n} {kind}' for kind, n in counts.most_common())}; {summary.bytes / 2**20:.1f} MiB)")
    return 0
