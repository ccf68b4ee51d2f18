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
