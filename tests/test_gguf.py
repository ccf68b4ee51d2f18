"""GGUF files in: tiny files written here with the `gguf` package's GGUFWriter as llama.cpp's converter writes
them (`convert_hf_to_gguf.py`: its metadata keys, tensor names, llama's permuted q/k, deepseek2's stacked experts
and split kv_b), quantised with `gguf.quants`; transformers' own GGUF loader is the oracle for llama and qwen2.

The gguf package has no quantisers for the K-quants (Q4_K, Q5_K, Q6_K), only dequantisers: those tensors are
written as raw blocks of random bytes with sane scales, which both readers dequantise with the same package.
"""

from __future__ import annotations

import importlib.util
import json
import math
from functools import cache
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import nanoseek_model, perturb, tiny_config
from gguf import GGMLQuantizationType as Q
from gguf.constants import MODEL_ARCH

import nanoseek
from nanoseek import CheckpointError, SamplingParams
from nanoseek.cli import main as cli_main
from nanoseek.engine.errors import EngineError
from nanoseek.gguf_files import read_gguf
from nanoseek.model import build_model
from nanoseek.tokenizer import IncrementalDetokenizer

CONTROL = ["<|begin_of_text|>", "<|end_of_text|>", "<|user|>", "<|assistant|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
            "{% else %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|><think>{% endif %}")
TEXTS = ["hello world", "The quick brown fox 12345 jumps over 3.14159!", "  two  spaces\n\nnew lines\ttabs",
         "unicode: café naïve 日本語 🚀", "<|user|>hi there<|assistant|><think>ok<|end_of_text|>",
         "it's we'll they're I'M", "1,000,000 and 42"]
K_QUANT_SCALES = {Q.Q4_K: [(0, 1e-3), (2, 5e-4)], Q.Q5_K: [(0, 5e-4), (2, 2e-4)], Q.Q6_K: [(208, 2e-4)]}


# ---- writing files as llama.cpp does -----------------------------------------------------------------
@cache
def vocabulary() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE trained here: tokens, merges and llama.cpp token types (control, user-defined, normal)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[*CONTROL, "<think>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS * 20 + ["the lazy dog sleeps while the fox runs"] * 40, trainer)
    model = json.loads(backend.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [3 if t in CONTROL else 4 if t == "<think>" else 1 for t in tokens]
    return tokens, merges, types


def add_tokenizer(writer: gguf.GGUFWriter, pre: str, add_bos: bool) -> None:
    tokens, merges, types = vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index(CONTROL[0]))
    writer.add_eos_token_id(tokens.index(CONTROL[1]))
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(TEMPLATE)


def k_quant(rows: int, cols: int, kind: Q, rng: np.random.Generator) -> np.ndarray:
    """Raw blocks of a K-quant: random quants and sub-scales, the fp16 super-block scales set small."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset, value in K_QUANT_SCALES[kind]:
        raw[..., offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, kind: Q, rng: np.random.Generator) -> None:
    """Quantised by the gguf package where it can, raw K-quant blocks otherwise, F32/F16 as arrays."""
    if kind in K_QUANT_SCALES:
        writer.add_tensor(name, k_quant(*array.shape, kind, rng), raw_dtype=kind)
    elif kind in (Q.F32, Q.F16):
        writer.add_tensor(name, array.astype(np.float32 if kind == Q.F32 else np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)


def finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def copy_gguf(source: Path, target: Path, drop: tuple[str, ...] = (), edit=None) -> Path:
    """`source` rewritten to `target` without the metadata keys in `drop`, `edit(writer)` adding others."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
    if edit is not None:
        edit(writer)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    finish(writer)
    return target


def llama_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: each head's rotate-half halves interleaved, for its adjacent-pair RoPE."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


LLAMA_TYPES = [  # per layer: q, k, v, o, gate, up, down -- every supported type on some tensor
    (Q.Q8_0, Q.Q4_1, Q.BF16, Q.F16, Q.Q4_0, Q.Q8_0, Q.Q4_K),
    (Q.Q4_0, Q.Q8_0, Q.Q8_0, Q.Q4_1, Q.BF16, Q.F16, Q.Q5_K),
    (Q.Q4_1, Q.Q4_0, Q.F16, Q.Q8_0, Q.Q8_0, Q.Q4_1, Q.Q6_K),
]


def write_dense(path: Path, arch: str = "llama", tokenizer: bool = True, skip: tuple[str, ...] = (),
                extra: dict[str, np.ndarray] | None = None, layers: int = 3, seed: int = 0) -> Path:
    """A llama or qwen2 file: 64 wide, 4 query and 2 kv heads of 16, FFN 256 (K-quant rows need 256).
    qwen2 gets q/k/v biases and a tied head, as Qwen2's converter writes them."""
    rng = np.random.default_rng(seed)
    vocab, hidden, heads, kv_heads, head_dim, ffn = len(vocabulary()[0]), 64, 4, 2, 16, 256
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0 if arch == "llama" else 1e6)
    writer.add_layer_norm_rms_eps(1e-5 if arch == "llama" else 1e-6)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(vocab)
    if tokenizer:
        add_tokenizer(writer, "llama-bpe" if arch == "llama" else "qwen2", add_bos=arch == "llama")

    def weight(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    tensors = {"token_embd.weight": (weight(vocab, hidden, scale=0.5), Q.F16),
               "output_norm.weight": (1 + weight(hidden), Q.F32)}
    if arch == "llama":
        tensors["output.weight"] = (weight(vocab, hidden), Q.Q8_0)
    for i in range(layers):
        q, k, v, o, gate, up, down = LLAMA_TYPES[i % 3]
        shapes = {"attn_q": (heads * head_dim, hidden, q), "attn_k": (kv_heads * head_dim, hidden, k),
                  "attn_v": (kv_heads * head_dim, hidden, v), "attn_output": (hidden, heads * head_dim, o),
                  "ffn_gate": (ffn, hidden, gate), "ffn_up": (ffn, hidden, up), "ffn_down": (hidden, ffn, down)}
        for leaf, (rows, cols, kind) in shapes.items():
            array = weight(rows, cols)
            if arch == "llama" and leaf in ("attn_q", "attn_k"):
                array = llama_permute(array, heads if leaf == "attn_q" else kv_heads)
            tensors[f"blk.{i}.{leaf}.weight"] = (array, kind)
        tensors[f"blk.{i}.attn_norm.weight"] = (1 + weight(hidden), Q.F32)
        tensors[f"blk.{i}.ffn_norm.weight"] = (1 + weight(hidden), Q.F32)
        if arch == "qwen2":
            for leaf, rows in (("attn_q", heads * head_dim), ("attn_k", kv_heads * head_dim),
                               ("attn_v", kv_heads * head_dim)):
                tensors[f"blk.{i}.{leaf}.bias"] = (weight(rows), Q.F32)
    tensors.update({name: (array, Q.F32) for name, array in (extra or {}).items()})
    for name, (array, kind) in tensors.items():
        if name not in skip:
            add_tensor(writer, name, array, kind, rng)
    finish(writer)
    return path


def transformers_model(path: Path) -> torch.nn.Module:
    """transformers' GGUF loader: `from_pretrained(dir, gguf_file=...)` where accelerate (which it insists on) is
    installed, else the two steps it takes for llama and qwen2 (the config from the metadata, the tensors from
    `load_gguf_checkpoint`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}, result
    return model.eval()


# ---- llama and qwen2 against transformers -------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_equal_transformers_gguf_loader(arch, tmp_path):
    path = write_dense(tmp_path / f"{arch}.gguf", arch)
    model = nanoseek.load_model(path)
    config = model.config
    assert (config.model_type, config.num_key_value_heads, config.tie_word_embeddings) == (arch, 2, arch == "qwen2")
    assert config.qkv_bias == (arch == "qwen2") and config.vocab_size == len(vocabulary()[0])
    oracle = transformers_model(path)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - oracle(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_and_chat_template_equal_transformers(arch, tmp_path):
    from transformers import AutoTokenizer

    path = write_dense(tmp_path / f"{arch}.gguf", arch, layers=1)
    ours = read_gguf(path).tokenizer
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    assert (ours.encode("hi")[0] == ours.bos_token_id) == (arch == "llama")  # add_bos_token from the file
    messages = [{"role": "user", "content": "what is 2+2?"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                            add_generation_prompt=True)


@cache
def sentencepiece_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """A Llama-2-style SentencePiece BPE vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then pieces trained
    here (U+2581 for a space) scored by merge order, with llama.cpp's token types (2 unknown, 3 control, 6 byte)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.train_from_iterator(TEXTS[:3] * 20 + ["the lazy dog sleeps while the fox runs"] * 40,
                                trainers.BpeTrainer(vocab_size=160, show_progress=False))
    model = json.loads(backend.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256)), *pieces]
    scores = [0.0] * 259 + [-float(rank) for rank in range(len(pieces))]
    return tokens, scores, [2, 3, 3] + [6] * 256 + [1] * len(pieces)


@pytest.mark.parametrize("space_prefix", [True, False])
def test_sentencepiece_tokenizer_equals_transformers(space_prefix, tmp_path):
    from transformers import AutoTokenizer

    tokens, scores, types = sentencepiece_vocabulary()

    def sentencepiece(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        if not space_prefix:
            writer.add_add_space_prefix(False)
        writer.add_chat_template(TEMPLATE)

    path = copy_gguf(write_dense(tmp_path / "base.gguf", tokenizer=False, layers=1), tmp_path / "spm.gguf",
                     edit=sentencepiece)
    ours = read_gguf(path).tokenizer
    for text in [*TEXTS, "€uro\u00fc <s>inside</s> end", "x"]:
        ids = ours.encode(text)
        assert ids[0] == 1  # no add_bos_token key: a SentencePiece vocabulary adds BOS (llama.cpp's default)
        if not text.startswith(" "):  # a leading space is the prefix the decoder strips (as transformers)
            assert ours.decode(ids, skip_special_tokens=True) == text.replace("<s>", "").replace("</s>", "")
        if space_prefix:  # transformers' GGUF loader ignores add_space_prefix = false
            theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
            assert ids == theirs(text)["input_ids"], text
            assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    text = "the fox: 日本語 café"
    ids = ours.encode(text, add_special_tokens=False)
    assert any(tokens[i].startswith("<0x") for i in ids)  # bytes no piece covers
    stream = IncrementalDetokenizer(ours, [])
    assert "".join(stream.push(i) for i in ids) + stream.flush() == ours.decode(ids)  # never a split character
    assert b"".join(ours.token_bytes(i) for i in ids) == ((" " if space_prefix else "") + text).encode()
    first = tokens[ours.encode("the")[1]]
    assert first.startswith("\u2581") == space_prefix


def test_llm_generates_and_chats_with_the_files_tokenizer(tmp_path):
    path = write_dense(tmp_path / "llama.gguf", layers=1)
    llm = nanoseek.LLM(path, device="cpu", max_model_len=64)
    tokens = vocabulary()[0]
    assert llm.eos_ids == {tokens.index("<|end_of_text|>")}
    out = llm.generate("hello world", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("hello world") and len(out.outputs[0].token_ids) == 4
    reply = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3, temperature=0))[0]
    rendered = "<|begin_of_text|><|user|>hi<|assistant|><think>"
    assert reply.prompt_token_ids == llm.tokenizer.encode(rendered, add_special_tokens=False)
    assert reply.prompt_token_ids[-1] == tokens.index("<think>")  # a user-defined token stays whole


def test_sampling_defaults_come_from_the_metadata(tmp_path):
    def sampling(writer: gguf.GGUFWriter) -> None:
        writer.add_float32("general.sampling.temp", 0.6)
        writer.add_float32("general.sampling.top_p", 0.95)
        writer.add_uint32("tokenizer.ggml.eot_token_id", 3)

    path = copy_gguf(write_dense(tmp_path / "plain.gguf", layers=1), tmp_path / "sampling.gguf", edit=sampling)
    llm = nanoseek.LLM(path, device="cpu", max_model_len=32)
    defaults = llm.default_sampling_params()
    assert math.isclose(defaults.temperature, 0.6, rel_tol=1e-6) and math.isclose(defaults.top_p, 0.95, rel_tol=1e-6)
    assert llm.eos_ids == {1, 3}


def test_a_file_without_tokenizer_loads_weights_only(tmp_path):
    path = write_dense(tmp_path / "bare.gguf", tokenizer=False, layers=1)
    llm = nanoseek.LLM(path, device="cpu", max_model_len=32)
    assert llm.tokenizer is None
    assert len(llm.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids) == 3
    with pytest.raises(EngineError, match="a text prompt needs a tokenizer and this model has none"):
        llm.generate("hello")
    with pytest.raises(EngineError, match="chat needs a tokenizer"):
        llm.chat([{"role": "user", "content": "hi"}])


def test_cli_info_and_generate_read_gguf(tmp_path, capsys):
    path = write_dense(tmp_path / "llama.gguf", layers=1)
    assert cli_main(["info", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "LlamaForCausalLM" and report["model"] == str(path)
    assert cli_main(["generate", "--model", str(path), "--prompt", "hello", "--max-tokens", "3", "--temperature",
                     "0", "--json", "--device", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)["outputs"][0]["token_ids"]) >= 1


def test_llama3_rope_scaling_is_read_back_from_rope_freqs(tmp_path):
    theta, head_dim, factor, low, high, original = 10000.0, 16, 8.0, 1.0, 16.0, 128
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelength = 2 * math.pi / inv_freq
    smooth = np.clip((original / wavelength - low) / (high - low), 0, 1)
    divisors = (1 / ((1 - smooth) / factor + smooth)).astype(np.float32)
    assert ((divisors > 1.001) & (divisors < factor - 0.001)).sum() >= 2  # the fit is exercised
    path = write_dense(tmp_path / "llama3.gguf", tokenizer=False, layers=1, extra={"rope_freqs.weight": divisors})

    def llama3(writer: gguf.GGUFWriter) -> None:  # Llama 3's theta and original length, as its converter writes
        writer.add_rope_freq_base(theta)
        writer.add_rope_scaling_orig_ctx_len(original)

    copy_gguf(path, tmp_path / "l3.gguf", drop=("llama.rope.freq_base",), edit=llama3)
    model = nanoseek.load_model(tmp_path / "l3.gguf")
    scaling = model.config.rope_scaling
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == factor
    assert math.isclose(scaling["low_freq_factor"], low, rel_tol=1e-4)
    assert math.isclose(scaling["high_freq_factor"], high, rel_tol=1e-4)
    expected = torch.tensor(inv_freq / divisors.astype(np.float64), dtype=torch.float32)
    torch.testing.assert_close(model.rotary.inv_freq, expected, rtol=1e-5, atol=0)
    with pytest.raises(CheckpointError, match="rope_freqs.weight holds per-frequency RoPE divisors that are not"):
        write_dense(tmp_path / "odd.gguf", tokenizer=False, layers=1,
                    extra={"rope_freqs.weight": np.linspace(1, 3, head_dim // 2)[::-1].astype(np.float32)})
        nanoseek.load_model(tmp_path / "odd.gguf")


# ---- deepseek2 -----------------------------------------------------------------------------------------
def deepseek_gguf_name(name: str, maps: tuple) -> str:
    """An HF name as llama.cpp's converter maps it (gguf's own tensor name maps; nextn as DeepSeek-V3.2's)."""
    base, suffix = name.rsplit(".", 1)
    if name.endswith("e_score_correction_bias"):  # renamed `e_score_correction.bias` by the converter
        base, suffix = name.removesuffix("_bias"), "bias"
    found = next(n for m in maps if (n := m.get_name(base)) is not None)
    return f"{found}.{suffix}"


def write_deepseek(path: Path, model: torch.nn.Module, split_kv: bool, sigmoid: bool) -> dict[str, torch.Tensor]:
    """The model as `DeepseekV2Model` writes it: experts stacked (Q8_0), kv_b split (newer files: MQA over the
    latent) or whole (older files), the rest F32. Returns the HF tensors as the file holds them (dequantised)."""
    c = model.config
    blocks = c.num_hidden_layers + len(model.mtp)
    writer = gguf.GGUFWriter(path, "deepseek2")
    add_deepseek_metadata(writer, c, blocks, split_kv, sigmoid)
    expected = add_deepseek_tensors(writer, model, blocks, split_kv)
    finish(writer)
    return expected


def add_deepseek_metadata(writer: gguf.GGUFWriter, c, blocks: int, split_kv: bool, sigmoid: bool) -> None:
    """`DeepseekV2Model.set_gguf_parameters` (and the generic `TextModel` keys it builds on)."""
    for key, value in (("context_length", c.max_position_embeddings), ("embedding_length", c.hidden_size),
                       ("block_count", blocks), ("feed_forward_length", c.intermediate_size),
                       ("head_count", c.num_attention_heads), ("vocab_size", c.vocab_size),
                       ("leading_dense_block_count", c.first_k_dense_replace),
                       ("kv_lora_rank", c.kv_lora_rank), ("expert_feed_forward_length", c.moe_intermediate_size),
                       ("expert_count", c.n_routed_experts), ("expert_shared_count", c.n_shared_experts),
                       ("expert_used_count", c.num_experts_per_tok), ("rope_dimension_count", c.qk_rope_head_dim)):
        getattr(writer, f"add_{key}")(value)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_expert_weights_scale(c.routed_scaling_factor)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    if c.norm_topk_prob:
        writer.add_expert_weights_norm(True)
    if c.n_group > 1:
        writer.add_expert_group_count(c.n_group)
        writer.add_expert_group_used_count(c.topk_group)
    if c.q_lora_rank:
        writer.add_q_lora_rank(c.q_lora_rank)
    if split_kv:  # llama.cpp since MLA became MQA over the latent
        writer.add_head_count_kv(1)
        writer.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
        writer.add_value_length(c.kv_lora_rank)
        writer.add_key_length_mla(c.qk_head_dim)
        writer.add_value_length_mla(c.v_head_dim)
    else:
        writer.add_head_count_kv(c.num_attention_heads)
        writer.add_key_length(c.qk_head_dim)
        writer.add_value_length(c.v_head_dim)
    if c.rope_scaling:
        rs = c.rope_scaling
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rs["factor"])
        writer.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_log_mul(0.1 * rs["mscale_all_dim"])
    if blocks > c.num_hidden_layers:  # MTP modules, as DeepSeek-V3.2's converter keeps them
        writer.add_nextn_predict_layers(blocks - c.num_hidden_layers)


def add_deepseek_tensors(writer: gguf.GGUFWriter, model: torch.nn.Module, blocks: int,
                         split_kv: bool) -> dict[str, torch.Tensor]:
    """`DeepseekV2Model.modify_tensors`: experts stacked (here Q8_0), kv_b split or whole, the rest as they are."""
    c = model.config
    maps = (gguf.get_tensor_name_map(MODEL_ARCH.DEEPSEEK2, blocks), gguf.get_tensor_name_map(MODEL_ARCH.GLM4_MOE,
                                                                                              blocks))
    state = {name: slot.read().float().clone() for name, slot in model.checkpoint_slots().items() if slot.saved}
    expected = dict(state)
    for layer in range(blocks):
        prefix = f"model.layers.{layer}."
        if f"{prefix}mlp.experts.0.gate_proj.weight" in state:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                names = [f"{prefix}mlp.experts.{e}.{proj}.weight" for e in range(c.n_routed_experts)]
                stacked = torch.stack([state.pop(n) for n in names]).numpy()
                blocks_q8 = gguf.quants.quantize(stacked, Q.Q8_0)
                writer.add_tensor(deepseek_gguf_name(f"{prefix}mlp.experts.{proj}.weight", maps), blocks_q8,
                                  raw_dtype=Q.Q8_0)
                for e, name in enumerate(names):
                    expected[name] = torch.from_numpy(gguf.quants.dequantize(blocks_q8, Q.Q8_0)[e].copy())
        kv_b = state.pop(f"{prefix}self_attn.kv_b_proj.weight")
        if split_kv:
            per_head = kv_b.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
            k_b, v_b = per_head.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
            writer.add_tensor(f"blk.{layer}.attn_k_b.weight", k_b.transpose(1, 2).contiguous().numpy())
            writer.add_tensor(f"blk.{layer}.attn_v_b.weight", v_b.contiguous().numpy())
        else:
            writer.add_tensor(f"blk.{layer}.attn_kv_b.weight", kv_b.numpy())
    for name, tensor in state.items():
        writer.add_tensor(deepseek_gguf_name(name, maps), tensor.numpy())
    return expected


def test_deepseek_v3_matches_transformers(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    reference = nanoseek_model(num_nextn_predict_layers=1)  # the tiny preset: YaRN, q_lora, groups, MTP
    expected = write_deepseek(tmp_path / "v3.gguf", reference, split_kv=True, sigmoid=True)
    for name, slot in reference.checkpoint_slots().items():  # the quantised experts, as the file holds them
        if slot.saved:
            slot.write(expected[name])
    model = nanoseek.load_model(tmp_path / "v3.gguf")
    config = model.config
    assert type(config) is nanoseek.ModelConfig  # DeepSeek-V3's family: sigmoid gating
    assert (config.n_group, config.topk_group, len(model.mtp)) == (4, 2, 1)
    assert config.rope_scaling["mscale_all_dim"] == 1.0 and config.rope_scaling["factor"] == 40
    reference.save_pretrained(tmp_path / "hf")
    oracle = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.run(ids, mtp=True)
        assert (ours.logits - oracle(ids).logits).abs().max() <= 1e-4
        mtp = reference.run(ids, mtp=True).mtp_logits[0]
        assert (ours.mtp_logits[0] - mtp).abs().max() <= 1e-4


def test_deepseek_v2_softmax_files(tmp_path):
    """Older-style file (kv_b whole, per-head key/value lengths, no q_lora): DeepSeek-V2 where the config family
    exists (transformers' DeepseekV2ForCausalLM the oracle), else a clear refusal."""
    from transformers import DeepseekV2ForCausalLM

    v2 = getattr(nanoseek.config, "DeepSeekV2Config", None)
    if v2 is None:
        reference = nanoseek_model(q_lora_rank=None)
        write_deepseek(tmp_path / "v2.gguf", reference, split_kv=False, sigmoid=False)
        with pytest.raises(CheckpointError, match="DeepSeek-V2 file .* no model_type deepseek_v2"):
            nanoseek.load_model(tmp_path / "v2.gguf")
        return
    torch.manual_seed(0)
    fields = {k: v for k, v in tiny_config().items() if k not in ("num_nextn_predict_layers",)}
    reference = perturb(build_model(v2(**{**fields, "q_lora_rank": None, "topk_method": "greedy", "n_group": 1,
                                          "topk_group": 1, "norm_topk_prob": False}).validate()).eval())
    expected = write_deepseek(tmp_path / "v2.gguf", reference, split_kv=False, sigmoid=False)
    for name, slot in reference.checkpoint_slots().items():
        if slot.saved:
            slot.write(expected[name])
    model = nanoseek.load_model(tmp_path / "v2.gguf")
    assert type(model.config) is v2 and model.config.topk_method == "greedy"
    reference.save_pretrained(tmp_path / "hf")
    oracle = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - reference(ids)).abs().max() <= 1e-5
        assert (model(ids) - oracle(ids).logits).abs().max() <= 1e-4


# ---- errors --------------------------------------------------------------------------------------------
def test_unsupported_architecture_and_tokenizer_are_named(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "gemma.gguf", "gemma2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    finish(writer)
    with pytest.raises(CheckpointError, match=r"gemma.gguf: GGUF architecture 'gemma2' is not supported; "
                                              r"supported: llama, qwen2, deepseek2"):
        nanoseek.load_model(tmp_path / "gemma.gguf")
    def wordpiece(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("bert")
        writer.add_token_list(["[UNK]", "[CLS]", "[SEP]"])

    copy_gguf(write_dense(tmp_path / "wpm.gguf", tokenizer=False, layers=1), tmp_path / "wpm2.gguf",
              edit=wordpiece)
    assert nanoseek.load_model(tmp_path / "wpm2.gguf") is not None  # weights need no tokenizer
    with pytest.raises(CheckpointError, match=r"tokenizer.ggml.model = 'bert' is not supported; supported: gpt2 "
                                              r"\(byte-level BPE.*\), llama \(SentencePiece BPE"):
        nanoseek.LLM(tmp_path / "wpm2.gguf", device="cpu")


def test_unsupported_quantisation_type_names_tensor_and_type(tmp_path):
    path = tmp_path / "q8_1.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    raw = np.zeros((4, 2 * gguf.GGML_QUANT_SIZES[Q.Q8_1][1]), np.uint8)
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=Q.Q8_1)
    finish(writer)
    with pytest.raises(CheckpointError, match=r"tensor blk.0.attn_q.weight is Q8_1, a type nanoseek cannot "
                                              r"dequantise; supported: F32, F16, BF16, .*Q4_0, Q4_1, .*Q8_0, .*Q4_K"):
        nanoseek.load_model(path)


def test_truncated_or_foreign_file_is_a_clear_error(tmp_path):
    path = write_dense(tmp_path / "full.gguf", layers=1)
    data = path.read_bytes()
    for size in (len(data) - 1000, len(data) // 2, 12):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=rf"cut{size}.gguf: cannot read the GGUF file .* truncated"):
            nanoseek.load_model(cut)
    (tmp_path / "text.gguf").write_text("not a model at all")
    with pytest.raises(CheckpointError, match="text.gguf: not a GGUF file"):
        nanoseek.load_model(tmp_path / "text.gguf")
    with pytest.raises(CheckpointError, match="nothing.gguf: no such GGUF file"):
        nanoseek.load_model(tmp_path / "nothing.gguf")


def test_missing_unexpected_and_misshaped_tensors_share_the_checkpoint_messages(tmp_path):
    missing = write_dense(tmp_path / "missing.gguf", tokenizer=False, layers=1, skip=("blk.0.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): model.layers.0.mlp.up_proj.weight"):
        nanoseek.load_model(missing)
    extra = write_dense(tmp_path / "extra.gguf", tokenizer=False, layers=1,
                        extra={"blk.0.attn_sinks.weight": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\): blk.0.attn_sinks.weight"):
        nanoseek.load_model(extra)
    copy_gguf(write_dense(tmp_path / "base.gguf", tokenizer=False, layers=1), tmp_path / "shape.gguf",
              drop=("llama.feed_forward_length",), edit=lambda w: w.add_feed_forward_length(128))  # tensors: 256
    with pytest.raises(CheckpointError, match=r"mis-shaped tensor\(s\): model.layers.0.mlp.gate_proj.weight: "
                                              r"checkpoint \[256, 64\], model \[128, 64\]"):
        nanoseek.load_model(tmp_path / "shape.gguf")


def test_missing_metadata_key_is_named(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "bare.gguf", "qwen2")
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((4, 64), np.float32))
    finish(writer)
    with pytest.raises(CheckpointError, match="GGUF metadata key `qwen2.attention.head_count` is missing"):
        nanoseek.load_model(tmp_path / "bare.gguf")
