"""The command line, run as real subprocesses: `nanoseek info` and the Quickstart's `demo`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import nanoseek
from nanoseek.sizing import parameter_counts


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True, check=check)


def test_help_lists_the_commands():
    out = run("--help").stdout
    assert "info" in out and "demo" in out


def test_info_reproduces_deepseek_v3_sizes_without_allocating():
    report = json.loads(run("info", "--preset", "deepseek-v3", "--json").stdout)
    assert abs(report["parameters"] / 671e9 - 1) < 0.01
    # DeepSeek counts 36.6B activated (README_WEIGHTS.md, head included, embedding table not): the paper's 37B.
    assert abs(report["activated_parameters"] / 36.6e9 - 1) < 0.01
    assert round(report["activated_parameters"] / 1e9) == 37
    assert abs(report["mtp_parameters"] / 11.5e9 - 1) < 0.015
    assert abs((report["parameters"] + report["mtp_stored_parameters"]) / 685e9 - 1) < 0.01  # the hub's total
    assert report["kv_cache_bytes_per_token"] == 576 * 61 * 2  # 70,272 B (V3 paper §2.1.1)
    assert report["mha_kv_cache_bytes_per_token"] == 40960 * 61 * 2
    text = run("info", "--preset", "deepseek-v3").stdout
    assert "671.03B total, 36.63B activated" in text and "71.1x smaller" in text


def test_info_reproduces_deepseek_v2_sizes():
    report = json.loads(run("info", "--preset", "deepseek-v2-lite", "--json").stdout)
    assert report["architecture"] == "DeepseekV2ForCausalLM" and report["mtp_modules"] == 0
    assert abs(report["parameters"] / 15.7e9 - 1) < 0.01  # V2 paper appendix B
    # Appendix B's 2.4B activated: counted as V3's 36.6B is (head included, embedding not) V2-Lite has 2.45B; no
    # consistent accounting lands within 1% of 2.4B (without the head 2.24B, with the embedding too 2.66B).
    assert abs(report["activated_parameters"] / 2.4e9 - 1) < 0.025
    assert report["kv_cache_bytes_per_token"] == 576 * 27 * 2
    text = run("info", "--preset", "deepseek-v2-lite").stdout
    assert "15.71B total, 2.45B activated" in text and "published: 15.7B total, 2.4B activated" in text
    full = json.loads(run("info", "--preset", "deepseek-v2", "--json").stdout)
    assert abs(full["parameters"] / 236e9 - 1) < 0.01 and abs(full["activated_parameters"] / 21e9 - 1) < 0.01


def test_info_reads_a_checkpoint_directory(tiny_checkpoint):
    report = json.loads(run("info", str(tiny_checkpoint), "--json").stdout)
    model = nanoseek.load_model(tiny_checkpoint)
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    main += sum(b.numel() for n, b in model.named_buffers() if "correction" in n and not n.startswith("mtp."))
    assert report["parameters"] == main


def test_info_on_a_missing_directory_is_a_clear_error(tmp_path):
    result = run("info", str(tmp_path / "nope"), check=False)
    assert result.returncode == 2
    assert "no config.json" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["tiny", "nano", "small"])
@pytest.mark.parametrize("q_lora", [True, False])
def test_parameter_arithmetic_matches_the_modules(name, q_lora):
    config = nanoseek.preset(name) if q_lora else nanoseek.preset(name, q_lora_rank=None)
    with torch.device("meta"):
        model = nanoseek.CausalLM(config)
    sizes = {n: t.numel() for n, t in [*model.named_parameters(), *model.named_buffers()] if n != "rotary.inv_freq"}
    counts = parameter_counts(config)
    assert counts.total == sum(v for n, v in sizes.items() if not n.startswith("mtp."))
    assert counts.mtp_total == sum(v for n, v in sizes.items() if n.startswith("mtp."))
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    inactive = (config.n_routed_experts - config.num_experts_per_tok) * expert
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    embedding = config.vocab_size * config.hidden_size
    assert counts.activated == counts.total - moe_layers * inactive - embedding


def test_demo_round_trips_and_decodes(tmp_path):
    result = run("demo", "--preset", "tiny", "--out", str(tmp_path / "demo"), "--tokens", "24")
    assert "matches the full expanded forward" in result.stdout
    assert (tmp_path / "demo" / "model.safetensors").exists()


def test_generate_command_streams_and_prints_json(chat_checkpoint):
    result = run("generate", "--model", str(chat_checkpoint), "--prompt", "the cat", "--max-tokens", "8",
                 "--temperature", "0")
    assert "[finish: " in result.stderr
    out = run("generate", "--model", str(chat_checkpoint), "--prompt-ids", "3,4,5", "--max-tokens", "5",
              "--temperature", "0.8", "--seed", "1", "--n", "2", "--json", "--speculative")
    report = json.loads(out.stdout)
    assert report["prompt_token_ids"] == [3, 4, 5] and len(report["outputs"]) == 2
    bad = run("generate", "--model", str(chat_checkpoint), "--prompt", "x", "--top-p", "0", check=False)
    assert bad.returncode == 2 and "SamplingParams.top_p = 0.0" in bad.stderr


def test_chat_command_shows_reasoning_and_resets(chat_checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "nanoseek", "chat", "--model", str(chat_checkpoint), "--max-tokens", "12",
         "--temperature", "0"], input="what is 2 + 3?\n/reset\nhello\n/exit\n", capture_output=True, text=True,
        check=True, timeout=120)
    # the template opens <think>, so each reply starts as reasoning
    assert result.stdout.count("[thinking]") == 2 and "[conversation cleared]" in result.stdout


def test_plot_curves_writes_a_png(tmp_path):
    from nanoseek.report import plot_curves

    for run in ("a", "b"):
        (tmp_path / f"{run}.jsonl").write_text("\n".join(json.dumps({"step": s, "reward": s / 10, "loss": 1 / s})
                                                         for s in range(1, 11)) + "\n")
    png = plot_curves({"a": tmp_path / "a.jsonl", "b": tmp_path / "b.jsonl"}, ["reward", "loss", "missing"],
                      tmp_path / "plots" / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_info_reads_dense_checkpoints_that_transformers_wrote(family, tied, tmp_path):
    import transformers

    kind = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    config = kind[0](vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                     num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied)
    kind[1](config).save_pretrained(tmp_path)
    report = json.loads(run("info", str(tmp_path), "--json").stdout)
    oracle = kind[1](config)
    assert report["parameters"] == oracle.num_parameters()  # a tied head counts once, as transformers counts it
    assert report["architecture"] == type(oracle).__name__ and report["mtp_modules"] == 0
    # grouped-query attention caches 2 of 6 heads' keys and values: 3x smaller than multi-head
    assert report["kv_cache_bytes_per_token"] == 3 * 2 * 2 * 8 * 2 and report["kv_cache_ratio"] == 3
    text = run("info", str(tmp_path)).stdout
    assert "grouped-query" in text and "MTP" not in text


def test_a_run_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    run_file = tmp_path / "run.toml"
    run_file.write_text('max-steps = 5\nseq_len = 32\n[pretrain]\nbatch-size = 2\ncorpus-docs = 300\n'
                        'preset = "tiny"\n[grpo]\ngroup-size = 3\n')
    result = run("pretrain", "--config", str(run_file), "--max-steps", "2", "--out", str(tmp_path / "run"),
                 "--eval-every", "2", "--save-every", "2")
    assert "pretraining tiny" in result.stdout and "steps of 2 x 32 tokens" in result.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the flag's 2 steps, not the file's 5
    assert "too small for a byte-level BPE" in result.stdout  # the tiny preset, fitted


@pytest.mark.parametrize("argv, message", [
    (["grpo", "--model", "m", "--mtp-lambda", "0.3"], "--mtp-lambda: GRPO's loss has no MTP term"),
    (["grpo", "--model", "m", "--eval-batches", "2"], "--eval-batches: GRPO validates on --val-problems"),
    (["distill", "--student", "s", "--bias-gamma", "0.01"], "--bias-gamma: the dense student has no router"),
    (["sft", "--model", "m", "--cost-price", "3"], "--cost-price: only `nanoseek pretrain` projects a GPU cost"),
])
def test_flags_a_command_would_ignore_are_refused(argv, message):
    result = run(*argv, check=False)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("text, message", [
    ("bogus = 1\n", "`bogus` is not a setting of `nanoseek eval`"),
    ("samples = \"many\"\n", "`samples` = 'many': not a valid int"),
    ("template = \"other\"\n", "`template` = 'other': must be one of chat, zero"),
    ("curve = 3\n", "`curve` = 3: must be true or false"),
    ("[evaluate]\nsamples = 2\n", "table [evaluate] is not a command"),
    ("samples = \n", "not valid TOML"),
])
def test_a_bad_run_file_is_refused_naming_file_and_key(text, message, tmp_path):
    run_file = tmp_path / "run.toml"
    run_file.write_text(text)
    result = run("eval", "--model", "m", "--config", str(run_file), check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert str(run_file) in result.stderr


def test_a_model_config_json_given_as_run_file_is_pointed_to_its_flag(tmp_path):
    result = run("pretrain", "--config", str(tmp_path / "config.json"), check=False)
    assert result.returncode == 2 and "--model-config" in result.stderr


def test_the_tiny_preset_pretrains_on_a_text_file(tmp_path):
    """Its 128-row vocabulary is too small for a byte-level BPE: the run fits it and says so."""
    text = tmp_path / "notes.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200)))
    result = run("pretrain", "--preset", "tiny", "--data", str(text), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every", "1")
    assert "using 320 (--vocab-size sets it)" in result.stdout
    assert nanoseek.load_model(tmp_path / "run" / "latest").config.vocab_size == 320


def test_weight_memory_is_what_the_model_holds():
    from nanoseek.sizing import weight_bytes

    config = nanoseek.preset("tiny")
    model = nanoseek.CausalLM(config)  # fp32: 4 bytes a value, parameters and persistent buffers
    held = {n: t.numel() * t.element_size() for n, t in model.state_dict().items()}
    main, mtp = weight_bytes(config, dtype_bytes=4)
    assert main == sum(v for n, v in held.items() if not n.startswith("mtp."))
    assert mtp == sum(v for n, v in held.items() if n.startswith("mtp.")) > 0


def test_info_says_deepseek_v2_lite_fits_24_gib_at_int4_not_at_bf16():
    bf16 = json.loads(run("info", "--preset", "deepseek-v2-lite", "--json").stdout)
    int4 = json.loads(run("info", "--preset", "deepseek-v2-lite", "--quantize", "int4", "--json").stdout)
    assert bf16["weight_bytes"] > 24 * 1024**3 and bf16["context_tokens_that_fit"] == 0
    assert int4["weight_bytes"] < 10 * 1024**3
    room = 24 * 1024**3 - int4["weight_bytes"]
    assert int4["context_tokens_that_fit"] == room // int4["kv_cache_bytes_per_token"] > 100_000
    assert "int4 matrices in groups of 64" in run("info", "--preset", "deepseek-v2-lite", "--quantize", "int4").stdout


def test_the_command_line_replaces_the_run_files_lists_and_exclusive_choices(tmp_path):
    from nanoseek.cli import _apply_run_file, build_parser
    from nanoseek.flags import RunFileError

    parser = build_parser()
    run_file = tmp_path / "run.toml"
    run_file.write_text('[grpo]\nreward = ["a:b", "c:d"]\ntasks = "-x"\n[pretrain]\npreset = "nano"\n')
    args = parser.parse_args(_apply_run_file(parser, ["grpo", "--model", "m", "--config", str(run_file),
                                                      "--reward", "e:f"]))
    assert args.reward == ["e:f"] and args.tasks == "-x"
    args = parser.parse_args(_apply_run_file(parser, ["pretrain", "--config", str(run_file), "--model-config", "c"]))
    assert args.preset is None and args.model_config == "c"
    with pytest.raises(RunFileError, match="given 2 times"):
        _apply_run_file(parser, ["eval", "--config", str(run_file), f"--config={run_file}"])
    assert run("eval", "--model", "m", "--conf", str(run_file), check=False).returncode == 2  # no abbreviation
