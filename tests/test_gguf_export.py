"""GGUF files out (`nanoseek export-gguf`): tiny models of every family written as llama.cpp's converter writes
them, read back by nanoseek's own GGUF reader (logits equal to the source's in f32, within the quantisation's
error otherwise) and, for llama and qwen2, by transformers' GGUF loader, the oracle (logits equal to ours on the
same file). transformers' loader has no deepseek2, so those files are checked by our reader and their metadata.

llama.cpp itself is the oracle where `NANOSEEK_NODE_LLAMA_CPP` names a directory with the npm package
node-llama-cpp installed (its prebuilt llama.cpp, `npm install node-llama-cpp --ignore-scripts`): f32 files of every
family give llama.cpp's logits equal to ours and its tokenizer our ids (skipped otherwise, as in CI).

A quantised file must be exactly the source model with each weight rounded as llama.cpp's rules type it (the
gguf package's quantisers applied to the HF tensors): equal logits. Its distance from the f32 logits is then
bounded as a sanity check, RMS error over RMS logit, measured on these random models (f16 1e-3, bf16 9e-3, Q8_0
3e-2, Q4_0 4e-1) and doubled: f16 and bf16 round each weight (bf16 to 8 bits), Q8_0 keeps 8 bits per
32-value block, Q4_0 4 bits, and random weights of this size have no margin to hide the noise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from copy import deepcopy
from functools import cache
from pathlib import Path

import gguf
import pytest
import torch
from conftest import make_tokenizer, perturb, tiny_config
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from test_gguf import TEXTS, copy_gguf, transformers_model, write_dense

import nanoseek
from nanoseek.cli import main as cli_main
from nanoseek.config import DeepSeekV2Config, DenseConfig
from nanoseek.gguf_export import FILE_TYPES, ExportError, export_gguf
from nanoseek.gguf_files import read_gguf_tokenizer
from nanoseek.model import build_model
from nanoseek.tokenizer import Tokenizer, train_tokenizer

VOCAB = 320  # the model's rows; the tokenizer has fewer, so the token list is padded as llama.cpp pads it
TOLERANCE = {"f16": 3e-3, "bf16": 2e-2, "q8_0": 6e-2, "q4_0": 8e-1}  # RMS error / RMS logit
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


@cache
def byte_tokenizer() -> Tokenizer:
    """nanoseek's own byte-level BPE (GPT-2's split, R1's chat template), as `pretrain` trains one."""
    return train_tokenizer(TEXTS * 20 + ["the lazy dog sleeps while the fox runs"] * 40, vocab_size=300)


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of a trained model's scale (init's 0.02 gives near-zero logits), norms near 1."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        param.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)
    return perturb(model, seed).eval()


def dense(arch: str, **overrides) -> torch.nn.Module:
    """64 wide, 4 query and 2 kv heads of 16, FFN 128: every matrix row a whole number of 32-value blocks."""
    fields = dict(model_type=arch, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=arch == "qwen2", rope_theta=10000.0 if arch == "llama" else 1e6,
                  rms_norm_eps=1e-5)
    return randomise(build_model(DenseConfig(**{**fields, **overrides}).validate()))


def deepseek(v2: bool = False, **overrides) -> torch.nn.Module:
    """The tiny preset (YaRN, q_lora, groups; every dimension distinct), or its DeepSeek-V2 sibling."""
    torch.manual_seed(0)
    fields = tiny_config(vocab_size=VOCAB, **overrides)
    if v2:
        fields.pop("num_nextn_predict_layers")
        config = DeepSeekV2Config(**{**fields, "q_lora_rank": None, "topk_method": "greedy", "n_group": 1,
                                     "topk_group": 1, "norm_topk_prob": False, **overrides})
    else:
        config = nanoseek.ModelConfig(**fields)
    return randomise(build_model(config.validate()))


MODELS = {
    "llama": lambda: dense("llama"), "qwen2": lambda: dense("qwen2"),
    "llama_bias": lambda: dense("llama", attention_bias=True, tie_word_embeddings=True),
    "deepseek_v3": lambda: deepseek(num_nextn_predict_layers=1), "deepseek_v2": lambda: deepseek(v2=True,
                                                                                                 q_lora_rank=24),
}


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def fields(path: Path) -> dict:
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items() if not key.startswith("GGUF.")
            and key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}


# ---- logits ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODELS))
def test_f32_file_reads_back_with_the_same_logits(kind, tmp_path):
    model = MODELS[kind]()
    out = tmp_path / f"{kind}.gguf"
    summary = export_gguf(model, byte_tokenizer(), out, "f32")
    assert set(summary.tensor_types.values()) == {"F32"} and out.stat().st_size == summary.bytes
    loaded = nanoseek.load_model(out)
    assert type(loaded.config) is type(model.config) and len(loaded.mtp) == 0  # MTP dropped, as llama.cpp's
    assert (logits(loaded) - logits(model)).abs().max() <= 1e-5
    if kind in ("llama", "qwen2"):  # transformers' GGUF loader: llama and qwen2 only (no deepseek2)
        with torch.no_grad():
            assert (transformers_model(out)(IDS).logits - logits(loaded)).abs().max() <= 1e-4


def rounded(model: torch.nn.Module, file_type: str) -> torch.nn.Module:
    """A copy of `model` with each matrix rounded as the file stores it, by llama.cpp's rules, with gguf-py's own
    quantisers: 1-D tensors and the router kept, the output Q8_0 under q4_0, rows that are not whole blocks F16.
    Blocks run along the input features in both layouts (llama's q/k permutation and the expert stacks move whole
    rows); MLA's k_b is transposed, but its rows here are 16 wide either way, so F16."""
    copy, kind = deepcopy(model), FILE_TYPES[file_type][1]
    slots = copy.checkpoint_slots()
    tied = not slots["lm_head.weight"].saved
    for name, slot in slots.items():
        weight = slot.read().numpy()
        if not slot.saved or weight.ndim < 2 or name.endswith("mlp.gate.weight"):
            continue
        own = Q.Q8_0 if kind == Q.Q4_0 and name == ("model.embed_tokens.weight" if tied else "lm_head.weight") \
            else kind
        own = Q.F16 if weight.shape[-1] % gguf.GGML_QUANT_SIZES[own][0] else own
        slot.write(torch.from_numpy(dequantize(quantize(weight, own), own).reshape(weight.shape)))
    return copy


@pytest.mark.parametrize("file_type", ["f16", "bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "deepseek_v3", "deepseek_v2"])
def test_quantised_file_is_the_model_with_its_weights_rounded(kind, file_type, tmp_path):
    model = MODELS[kind]()
    out = tmp_path / f"{kind}-{file_type}.gguf"
    export_gguf(model, None, out, file_type)
    loaded, reference = logits(nanoseek.load_model(out)), logits(model)
    assert (loaded - logits(rounded(model, file_type))).abs().max() <= 1e-5
    error = (loaded - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()
    assert error <= TOLERANCE[file_type], error
    if kind in ("llama", "qwen2") and file_type in ("q8_0", "q4_0"):  # both readers dequantise the same blocks
        with torch.no_grad():
            assert (transformers_model(out)(IDS).logits - loaded).abs().max() <= 1e-4


def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 16.0,
               "original_max_position_embeddings": 128}
    model = dense("llama", rope_scaling=scaling)
    summary = export_gguf(model, None, tmp_path / "llama3.gguf", "f32")
    assert summary.tensor_types["rope_freqs.weight"] == "F32"
    loaded = nanoseek.load_model(tmp_path / "llama3.gguf")
    assert loaded.config.rope_scaling["rope_type"] == "llama3" and loaded.config.rope_scaling["factor"] == 8.0
    assert (logits(loaded) - logits(model)).abs().max() <= 1e-5


def test_deepseek_v2_without_q_lora_reads_back_and_warns_about_llama_cpp(tmp_path):
    model = deepseek(v2=True)  # DeepSeek-V2-Lite's attention: q_proj, no query compression
    with pytest.warns(UserWarning, match="only with 26 or 27 layers, DeepSeek-V2-Lite's, so this 3-layer file"):
        export_gguf(model, None, tmp_path / "lite.gguf", "f32")
    assert "deepseek2.attention.q_lora_rank" not in fields(tmp_path / "lite.gguf")
    loaded = nanoseek.load_model(tmp_path / "lite.gguf")
    assert loaded.config.q_lora_rank is None and (logits(loaded) - logits(model)).abs().max() <= 1e-5
    grouped = deepseek(v2=True, q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    with pytest.warns(UserWarning, match="llama.cpp scores one by its best two"):
        export_gguf(grouped, None, tmp_path / "grouped.gguf", "f32")
    loaded = nanoseek.load_model(tmp_path / "grouped.gguf")
    assert loaded.config.topk_method == "group_limited_greedy"
    assert (logits(loaded) - logits(grouped)).abs().max() <= 1e-5


def test_rotate_half_deepseek_rope_is_interleaved_for_llama_cpp(tmp_path):
    model = deepseek(rope_interleave=False)
    export_gguf(model, None, tmp_path / "half.gguf", "f32")
    loaded = nanoseek.load_model(tmp_path / "half.gguf")
    assert loaded.config.rope_interleave  # llama.cpp's layout
    assert (logits(loaded) - logits(model)).abs().max() <= 1e-5


LLAMA_CPP_SCRIPT = """
const [, , entry, modelPath, requestPath] = process.argv;
const {getLlama, LlamaLogLevel} = await import(entry);
const request = JSON.parse((await import("node:fs")).readFileSync(requestPath, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 64, batchSize: 64, flashAttention: false,
    experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32"});  // f16 would round the cache
const results = await context.getSequence().controlledEvaluate(
    request.ids.map((token) => [token, {generateNext: {logits: true}}]));
const logits = results.map((result) => Array.from({length: request.vocab}, (_, t) => result.next.logits.get(t)));
const tokenized = request.texts.map((text) => Array.from(model.tokenize(text, true)));
console.log(JSON.stringify({logits, tokenized, bos: model.tokens.bos, eos: model.tokens.eos}));
await context.dispose();
"""


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama_bias", "deepseek_v3", "deepseek_v2"])
def test_llama_cpp_runs_the_file_with_our_logits(kind, tmp_path):
    package = Path(os.environ.get("NANOSEEK_NODE_LLAMA_CPP", "/nonexistent")) / "node_modules" / "node-llama-cpp"
    if not (package / "dist" / "index.js").is_file() or shutil.which("node") is None:
        pytest.skip("llama.cpp via node-llama-cpp: set NANOSEEK_NODE_LLAMA_CPP to a directory where it is installed")
    model, tokenizer = MODELS[kind](), byte_tokenizer()
    export_gguf(model, tokenizer, tmp_path / "model.gguf", "f32")
    (tmp_path / "check.mjs").write_text(LLAMA_CPP_SCRIPT)
    (tmp_path / "request.json").write_text(json.dumps({"ids": IDS[0].tolist(), "texts": TEXTS, "vocab": VOCAB}))
    done = subprocess.run(["node", str(tmp_path / "check.mjs"), (package / "dist" / "index.js").as_uri(),
                           str(tmp_path / "model.gguf"), str(tmp_path / "request.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert (theirs["bos"], theirs["eos"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert theirs["tokenized"] == [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    assert (torch.tensor(theirs["logits"]) - logits(model)[0]).abs().max() <= 1e-4


# ---- what the file holds --------------------------------------------------------------------------------
def test_tensor_types_follow_llama_cpp(tmp_path):
    types = export_gguf(deepseek(), None, tmp_path / "v3.gguf", "q4_0").tensor_types
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.attn_q_a_norm.weight",
                 "blk.1.ffn_gate_inp.weight", "blk.1.exp_probs_b.bias"):
        assert types[name] == "F32", name  # norms, the router and its bias
    assert types["output.weight"] == "Q8_0"  # llama-quantize's Q6_K, which gguf-py cannot write
    assert types["token_embd.weight"] == types["blk.1.ffn_down_exps.weight"] == types["blk.0.attn_q_a.weight"] \
        == "Q4_0"
    assert types["blk.0.attn_k_b.weight"] == types["blk.0.attn_q_b.weight"] == "F16"  # rows of 16 and 24
    reader = gguf.GGUFReader(tmp_path / "v3.gguf")
    assert {t.name: t.tensor_type.name for t in reader.tensors} == types
    assert not any(".nextn." in name or name.startswith("blk.3.") for name in types)
    tied = export_gguf(dense("qwen2"), None, tmp_path / "qwen2.gguf", "q4_0").tensor_types
    assert "output.weight" not in tied and tied["token_embd.weight"] == "Q8_0"  # the embedding is the output
    assert tied["blk.0.attn_q.bias"] == "F32" and tied["blk.0.attn_q.weight"] == "Q4_0"


def test_deepseek_metadata_is_mla_as_mqa_and_the_routing(tmp_path):
    export_gguf(deepseek(num_nextn_predict_layers=1), None, tmp_path / "v3.gguf", "f16")
    meta = fields(tmp_path / "v3.gguf")
    expected = {"block_count": 3, "attention.head_count": 4, "attention.head_count_kv": 1,
                "attention.key_length": 16 + 8, "attention.value_length": 16, "attention.key_length_mla": 24,
                "attention.value_length_mla": 12, "attention.kv_lora_rank": 16, "attention.q_lora_rank": 24,
                "rope.dimension_count": 8, "expert_count": 8, "expert_used_count": 3, "expert_shared_count": 1,
                "leading_dense_block_count": 1, "expert_gating_func": 2, "expert_group_count": 4,
                "expert_group_used_count": 2, "rope.scaling.type": "yarn", "rope.scaling.factor": 40.0,
                "rope.scaling.original_context_length": 16, "vocab_size": VOCAB}
    assert {key: meta[f"deepseek2.{key}"] for key in expected} == expected
    assert meta["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16 and "deepseek2.nextn_predict_layers" not in meta
    export_gguf(MODELS["deepseek_v2"](), None, tmp_path / "v2.gguf", "f16")
    meta = fields(tmp_path / "v2.gguf")
    assert meta["deepseek2.expert_gating_func"] == 1 and "deepseek2.expert_group_count" not in meta


def test_tokenizer_and_chat_template_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tokenizer, model = byte_tokenizer(), dense("llama")
    model.generation_config = {"temperature": 0.6, "top_p": 0.95}
    out = tmp_path / "llama.gguf"
    export_gguf(model, tokenizer, out, "q8_0", name="tiny llama")
    meta = fields(out)
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"], meta["general.name"]) == \
        ("gpt2", "gpt-2", "tiny llama")
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id and meta["tokenizer.ggml.add_bos_token"]
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id and not meta["tokenizer.ggml.add_eos_token"]
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    tokens = gguf.GGUFReader(out).fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == VOCAB and tokens[-1] == f"[PAD{VOCAB - 1}]"
    ours, theirs = read_gguf_tokenizer(out), AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in TEXTS + ["<think>a</think><answer>b</answer>"]:
        ids = tokenizer.encode(text)
        assert ours.encode(text) == ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == tokenizer.decode(ids, skip_special_tokens=False)
    messages = [{"role": "user", "content": "what is 2+2?"}]
    assert ours.apply_chat_template(messages) == tokenizer.apply_chat_template(messages) == \
        theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    defaults = nanoseek.load_model(out).generation_config
    assert defaults["temperature"] == pytest.approx(0.6) and defaults["top_p"] == pytest.approx(0.95)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "deepseek-v3"])
def test_pre_tokenizer_is_named_by_its_split(pre, tmp_path):
    """A tokenizer read from a GGUF file (Split regexes, then ByteLevel) is written back under its own name."""
    source = copy_gguf(write_dense(tmp_path / "src.gguf", layers=1), tmp_path / "pre.gguf",
                       drop=("tokenizer.ggml.pre",), edit=lambda writer: writer.add_tokenizer_pre(pre))
    tokenizer = read_gguf_tokenizer(source)
    out = tmp_path / "out.gguf"
    export_gguf(dense("llama", vocab_size=tokenizer.vocab_size), tokenizer, out, "f16")
    assert fields(out)["tokenizer.ggml.pre"] == pre
    again = read_gguf_tokenizer(out)
    assert all(again.encode(text) == tokenizer.encode(text) for text in TEXTS)


# ---- the command and the errors -------------------------------------------------------------------------
def test_cli_exports_a_checkpoint_directory(tmp_path, capsys):
    model, checkpoint = dense("qwen2"), tmp_path / "student"
    model.save_pretrained(checkpoint)
    byte_tokenizer().save(checkpoint)
    out = tmp_path / "student.gguf"
    assert cli_main(["export-gguf", str(checkpoint), str(out), "--type", "q8_0"]) == 0
    assert f"wrote {out} (qwen2, q8_0: " in capsys.readouterr().out
    meta = fields(out)
    assert meta["general.name"] == "student" and meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    reference = logits(model)
    assert (logits(nanoseek.load_model(out)) - reference).abs().max() <= TOLERANCE["q8_0"] * reference.abs().max()
    assert nanoseek.LLM(out, device="cpu", max_model_len=32).tokenizer.encode("hi") == byte_tokenizer().encode("hi")
    assert cli_main(["export-gguf", str(checkpoint), str(out)]) == 2
    assert "student.gguf: already exists; pass --force" in capsys.readouterr().err
    assert cli_main(["export-gguf", str(checkpoint), str(out), "--force", "--type", "f32"]) == 0
    assert (logits(nanoseek.load_model(out)) - reference).abs().max() <= 1e-5
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    assert cli_main(["export-gguf", str(bare), str(tmp_path / "bare.gguf")]) == 2
    assert "bare: has no tokenizer (tokenizer.json)" in capsys.readouterr().err
    assert not (tmp_path / "bare.gguf").exists()
    assert cli_main(["export-gguf", str(bare), str(tmp_path / "bare.gguf"), "--no-tokenizer"]) == 0
    meta = fields(tmp_path / "bare.gguf")
    assert "tokenizer.ggml.model" not in meta and meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    with pytest.raises(SystemExit):
        cli_main(["export-gguf", str(checkpoint), str(out), "--type", "q5_k"])
    assert "invalid choice: 'q5_k'" in capsys.readouterr().err


def test_errors_name_the_problem(tmp_path, monkeypatch):
    model, out = dense("llama"), tmp_path / "x.gguf"
    with pytest.raises(ExportError, match=r"unknown GGUF type 'q5_k'; supported: f32, f16, bf16, q8_0, q4_0"):
        export_gguf(model, None, out, "q5_k")
    with pytest.raises(ExportError, match=r"x.bin: a GGUF file name must end in .gguf"):
        export_gguf(model, None, tmp_path / "x.bin")
    out.write_bytes(b"keep")
    with pytest.raises(ExportError, match=r"x.gguf: already exists; pass --force"):
        export_gguf(model, None, out)
    assert out.read_bytes() == b"keep"
    with pytest.raises(ExportError, match="not a byte-level BPE .* --no-tokenizer"):
        export_gguf(model, make_tokenizer(), tmp_path / "spm.gguf")
    with pytest.raises(ExportError, match=r"token ids up to \d+, beyond the model's vocab_size 280"):
        export_gguf(dense("llama", vocab_size=280), byte_tokenizer(), tmp_path / "small.gguf")
    with pytest.raises(ExportError, match="llama.cpp's deepseek2 supports only mscale == mscale_all_dim"):
        yarn = {**tiny_config()["rope_scaling"], "mscale": 0.707, "mscale_all_dim": 1.0}
        export_gguf(deepseek(rope_scaling=yarn), None, tmp_path / "yarn.gguf")
    with pytest.raises(ExportError, match="DeepSeek model with attention_bias"):
        export_gguf(deepseek(attention_bias=True), None, tmp_path / "bias.gguf")
    odd = Tokenizer.from_dir(_saved(byte_tokenizer(), tmp_path / "odd", split=r"\p{L}+|\s+"))
    with pytest.raises(ExportError, match="splits text in no way llama.cpp knows"):
        export_gguf(model, odd, tmp_path / "odd.gguf")

    def broken(self, **_):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(model, None, tmp_path / "half.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd", "x.gguf"]  # nothing half-written left behind


def _saved(tokenizer: Tokenizer, path: Path, split: str) -> Path:
    """`tokenizer` saved with its pre-tokenizer replaced by an unknown split before a regex-free ByteLevel."""
    from tokenizers import Regex, pre_tokenizers

    tokenizer.save(path)
    copy = Tokenizer.from_dir(path)
    copy.backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                          pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=False)])
    copy.save(path)
    return path
