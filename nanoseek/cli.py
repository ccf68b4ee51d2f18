"""The `nanoseek` command line: `nanoseek --help` lists the commands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .config import PRESETS, ConfigError, DenseConfig, ModelConfig, preset, read_config_file
from .flags import CONFIG_FLAG, DEFAULT_GROUP_SIZE, WEIGHT_FORMATS, RunFileError, add_weight_flags, with_run_file
from .sizing import (
    forward_flops_per_token,
    human,
    index_cache_bytes_per_token,
    kv_cache_bytes_per_token,
    parameter_counts,
    weight_bytes,
)

if TYPE_CHECKING:  # the engine loads torch: imported where a command needs it
    from .engine import LLM

# Figures DeepSeek published, printed beside ours for the presets that reproduce a released model.
PUBLISHED = {
    "deepseek-v3": "published: 671B total, 37B activated (V3 paper); 36.6B activated including the 0.9B head, "
                   "11.5B MTP, 685B on the hub (README_WEIGHTS.md)",
    "deepseek-v2-lite": "published: 15.7B total, 2.4B activated (DeepSeek-V2 report, appendix B)",
    "deepseek-v2": "published: 236B total, 21B activated (DeepSeek-V2 report, §3.1.2)",
}


def _load_config(args: argparse.Namespace) -> tuple[ModelConfig | DenseConfig, str]:
    if args.preset:
        return preset(args.preset), f"preset {args.preset}"
    path = Path(args.model)
    if path.suffix.lower() == ".gguf" and path.is_file():  # a llama.cpp file: the config is its metadata
        from .gguf_files import read_gguf_config

        return read_gguf_config(path), str(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.exists():
        raise ConfigError(f"{path}: no config.json; give a checkpoint directory, a config.json or --preset")
    return read_config_file(config_file), str(path)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _memory_report(config: ModelConfig | DenseConfig, args: argparse.Namespace, cache_per_token: int) -> dict:
    weights, mtp = weight_bytes(config, DTYPE_BYTES[args.dtype], args.quantize)
    budget = int(args.memory * 1024**3)
    return {"weight_bytes": weights, "mtp_weight_bytes": mtp, "weight_format": args.quantize or args.dtype,
            "weight_dtype": args.dtype,
            "memory_bytes": budget, "context_tokens_that_fit": max(0, budget - weights) // cache_per_token}


def _info_report(config: ModelConfig | DenseConfig, source: str, args: argparse.Namespace) -> dict:
    context, cache_bytes = args.context, args.cache_bytes
    counts = parameter_counts(config)
    cached, expanded = kv_cache_bytes_per_token(config, cache_bytes)
    index_cached, index_fp8 = index_cache_bytes_per_token(config, cache_bytes)
    weight_flops, attention_flops = forward_flops_per_token(config, context)
    return {**_memory_report(config, args, cached),
        "model": source, "architecture": config.architecture,
        "parameters": counts.total, "activated_parameters": counts.activated,
        "mtp_modules": config.num_nextn_predict_layers,
        "mtp_parameters": counts.mtp_total, "mtp_activated_parameters": counts.mtp_activated,
        "mtp_stored_parameters": counts.mtp_stored,
        "kv_cache_bytes_per_token": cached, "mha_kv_cache_bytes_per_token": expanded,
        "kv_cache_ratio": expanded / cached,
        "index_cache_bytes_per_token": index_cached, "index_cache_fp8_bytes_per_token": index_fp8,
        "forward_flops_per_token": weight_flops + attention_flops,
        "weight_flops_per_token": weight_flops, "attention_flops_per_token": attention_flops,
        "context": context, "cache_dtype_bytes": cache_bytes,
    }


def _info_lines(c: ModelConfig | DenseConfig, r: dict) -> list[str]:
    share = 100 * r["activated_parameters"] / r["parameters"]
    if isinstance(c, DenseConfig):
        cache = (f"grouped-query {human(r['kv_cache_bytes_per_token'], 'B')} ({c.num_key_value_heads} KV heads x 2 x "
                 f"{c.head_size} values")
    else:
        index = f" + {c.index_head_dim} indexer key" if c.index_cache_dim else ""
        cache = (f"latent {human(r['kv_cache_bytes_per_token'], 'B')} ({c.kv_lora_rank} + {c.qk_rope_head_dim}"
                 f"{index} values")
    lines = [
        f"model             {r['model']} ({r['architecture']})",
        f"parameters        {human(r['parameters'])} total, {human(r['activated_parameters'])} activated per token "
        f"({share:.1f}%)",
    ]
    if r["mtp_modules"]:
        lines.append(
            f"MTP modules       {r['mtp_modules']}: {human(r['mtp_parameters'])} own parameters, "
            f"{human(r['mtp_activated_parameters'])} activated per token (embedding and head shared with the main "
            f"model); {human(r['mtp_stored_parameters'])} stored with their checkpoint copies, "
            f"{human(r['parameters'] + r['mtp_stored_parameters'])} in the checkpoint")
    weights, attention = r["weight_flops_per_token"], r["attention_flops_per_token"]
    return lines + [
        f"KV cache / token  {cache} x {c.num_hidden_layers} layers x {r['cache_dtype_bytes']} bytes) vs multi-head "
        f"{human(r['mha_kv_cache_bytes_per_token'], 'B')}: {r['kv_cache_ratio']:.1f}x smaller",
        *_index_lines(c, r),
        f"forward FLOPs     {human(weights + attention, 'FLOP')} per token at {r['context']} tokens of "
        f"context ({human(weights, 'FLOP')} weights + {human(attention, 'FLOP')} attention)",
        _memory_line(r),
    ]


def _index_lines(c: ModelConfig | DenseConfig, r: dict) -> list[str]:
    """DeepSeek-V3.2: the indexer keys' share of the cache, and their size in the released FP8 form."""
    if not r["index_cache_bytes_per_token"]:
        return []
    return [f"indexer keys      {human(r['index_cache_bytes_per_token'], 'B')} of it; in DeepSeek-V3.2's FP8 form "
            f"({c.index_head_dim} bytes + fp32 scales per layer) {r['index_cache_fp8_bytes_per_token']:,} B; "
            f"sparse attention reads the top {c.index_topk:,} keys"]


def _memory_line(r: dict) -> str:
    form, rest = r["weight_format"], r["weight_dtype"]
    if form in WEIGHT_FORMATS:
        layout = "with per-channel scales" if form == "int8" else f"in groups of {DEFAULT_GROUP_SIZE}"
        form = f"{form} matrices {layout}, the rest {rest}"
    mtp = f" (MTP modules {human(r['mtp_weight_bytes'], 'B')} more)" if r["mtp_weight_bytes"] else ""
    return (f"memory            weights {human(r['weight_bytes'], 'B')}{mtp}, {form}: {human(r['memory_bytes'], 'B')} "
            f"holds them and {r['context_tokens_that_fit']:,} tokens of cache")


def cmd_info(args: argparse.Namespace) -> int:
    """Sizes from the config alone (any family): parameters, KV cache, FLOPs. Never allocates the weights."""
    config, source = _load_config(args)
    report = _info_report(config, source, args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    lines = _info_lines(config, report)
    if args.preset in PUBLISHED:
        lines.append(f"                  {PUBLISHED[args.preset]}")
    print("\n".join(lines))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a model, round-trip it through an HF checkpoint, run a forward pass and a cached decode."""
    import torch

    from .checkpoint import load_model
    from .model import CausalLM

    torch.manual_seed(args.seed)
    config = preset(args.preset)
    out = Path(args.out)
    started = time.perf_counter()
    CausalLM(config).save_pretrained(out)
    model = load_model(out)
    print(f"wrote and reloaded an HF checkpoint of preset {args.preset!r} at {out}")
    info = argparse.Namespace(preset=None, model=str(out), context=args.tokens, cache_bytes=4, json=False,
                              quantize=None, dtype="float32", memory=24.0)
    cmd_info(info)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    with torch.inference_mode():
        full = model(ids)
        cache = model.new_cache(num_slots=1, max_len=args.tokens)
        stepwise = torch.cat([model(ids[:, t:t + 1], torch.tensor([[t]]), cache) for t in range(args.tokens)], 1)
    diff = (full - stepwise).abs().max().item()
    print(f"forward: logits {list(full.shape)}; token-by-token absorbed decode over the latent cache matches "
          f"the full expanded forward to {diff:.1e} max abs")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0 if diff < 1e-3 else 1


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling", "unset: the checkpoint's generation_config.json, else max-tokens "
                                      "256, temperature 0.6, top-p 0.95 (R1's recommendation), the rest off")
    group.add_argument("--max-tokens", type=int)
    group.add_argument("--temperature", type=float, help="0 = greedy")
    group.add_argument("--top-p", type=float)
    group.add_argument("--top-k", type=int)
    group.add_argument("--min-p", type=float)
    group.add_argument("--presence-penalty", type=float, default=0.0)
    group.add_argument("--frequency-penalty", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--seed", type=int, default=None)
    parser.add_argument("--model", required=True, help="checkpoint directory or preset name")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--speculative", action="store_true", help="draft with the MTP module (V3 paper §5.4.3)")
    add_weight_flags(parser)


CLI_SAMPLING = {"max_tokens": 256, "temperature": 0.6, "top_p": 0.95}  # R1's model card, without a checkpoint's own


def _sampling_params(args: argparse.Namespace, llm: LLM, **changes):
    """The flags given, then the checkpoint's generation_config.json defaults, then CLI_SAMPLING's."""
    from .engine import SamplingParams

    flags = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                 min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    given = {name: value for name, value in flags.items() if value is not None}
    return SamplingParams(**{**CLI_SAMPLING, **llm.sampling_defaults, **given, "stop": args.stop, "seed": args.seed,
                             "presence_penalty": args.presence_penalty,
                             "frequency_penalty": args.frequency_penalty, **changes})


def _llm(args: argparse.Namespace):
    from .engine import LLM

    return LLM(args.model, device=args.device, dtype=args.dtype, speculative=args.speculative,
               max_num_seqs=max(1, getattr(args, "n", 1)), quantize=args.quantize,
               compile=args.compile, index_cache_dtype=args.index_cache_dtype)


def cmd_generate(args: argparse.Namespace) -> int:
    """Complete one prompt, streaming the text (n = 1) or printing every completion (n > 1, --json)."""
    llm = _llm(args)
    params = _sampling_params(args, llm, n=args.n)
    prompt: str | list[int] = args.prompt
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
    if args.json or args.n > 1:
        result = llm.generate([prompt], params)[0]
        if args.json:
            print(json.dumps({"prompt_token_ids": result.prompt_token_ids, "metrics": result.metrics,
                              "outputs": [vars(o) for o in result.outputs]}, default=str))
        else:
            for out in result.outputs:
                print(f"--- completion {out.index} ({out.finish_reason})\n{out.text}")
        return 0
    finish = None
    for delta in llm.stream(prompt, params):
        print(delta.text if llm.tokenizer else " ".join(map(str, delta.token_ids)), end=" " if not llm.tokenizer
              else "", flush=True)
        finish = delta.finish_reason or finish
    print(f"\n[finish: {finish}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat: streamed replies, reasoning shown apart from the answer; /reset, /exit."""
    from .r1 import REASONING, ReasoningParser, conversation_prompt

    llm = _llm(args)
    if llm.tokenizer is None:
        raise ValueError(f"--model {args.model}: chat needs a checkpoint with a tokenizer")
    params = _sampling_params(args, llm)
    tty = sys.stdout.isatty()
    dim, bold, reset = ("\x1b[2m", "\x1b[1m", "\x1b[0m") if tty else ("", "", "")
    history: list[dict[str, str]] = []
    print("nanoseek chat: type a message; /reset clears the conversation, /exit quits.", flush=True)
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history.clear()
            print("[conversation cleared]", flush=True)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt = conversation_prompt(llm.tokenizer, history)
        parser = ReasoningParser(in_reasoning=prompt.opened)
        answer, mode = [], None
        for delta in llm.stream(prompt.ids, params):
            for kind, text in parser.feed(delta.text) + (parser.finish() if delta.finish_reason else []):
                if kind != mode:
                    print(f"{dim}[thinking]{reset} " if kind == REASONING else f"\n{bold}[answer]{reset} ",
                          end="", flush=True)
                    mode = kind
                print(f"{dim}{text}{reset}" if kind == REASONING else text, end="", flush=True)
                if kind != REASONING:
                    answer.append(text)
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(answer).strip()})  # reasoning is not resent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3/R1, small and complete.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="parameters, activated parameters, KV-cache bytes and FLOPs per token")
    source = info.add_mutually_exclusive_group(required=True)
    source.add_argument("model", nargs="?", help="checkpoint directory or config.json")
    source.add_argument("--preset", choices=list(PRESETS), help="a built-in config")
    info.add_argument("--context", type=int, default=4096, help="context length for attention FLOPs")
    info.add_argument("--cache-bytes", type=int, default=2, help="bytes per cached value (2 = bf16)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--quantize", choices=WEIGHT_FORMATS, help="size the weights in this format")
    info.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bfloat16", help="the weights not quantised")
    info.add_argument("--memory", type=float, default=24.0, help="GiB to fit weights and cache in")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="build a model, save and reload it, run a forward pass and a cached decode")
    demo.add_argument("--preset", choices=["tiny", "nano", "small"], default="nano")
    demo.add_argument("--out", default="runs/demo", help="checkpoint directory to write")
    demo.add_argument("--tokens", type=int, default=64, help="sequence length of the check")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    generate = sub.add_parser("generate", help="complete a prompt (streamed)")
    _sampling_args(generate)
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    source.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    generate.add_argument("--n", type=int, default=1, help="completions per prompt")
    generate.add_argument("--json", action="store_true", help="print the full result as JSON")
    generate.set_defaults(func=cmd_generate)

    from . import eval as eval_module
    from . import gguf_export, long_context, report, serve, speedrun
    from .train import distill, grpo, pretrain, rejection, sft

    for name, module, summary in (
            ("pretrain", pretrain, "train a model from scratch (built-in corpus by default)"),
            ("sft", sft, "supervised fine-tuning on conversations (cold-start R1 data by default)"),
            ("grpo", grpo, "reinforcement learning with GRPO and rule-based rewards on verifiable tasks"),
            ("eval", eval_module, "held-out pass@1 over k samples, cons@k and pass@k, per task"),
            ("eval-long", long_context, "held-out pass-key retrieval and loss at long context lengths"),
            ("rejection-sample", rejection, "verified samples of a checkpoint as SFT data (R1's second SFT set)"),
            ("distill", distill, "train a dense student (Qwen2/Llama layout) on a teacher's traces, optionally its "
             "logits"),
            ("serve", serve, "OpenAI/DeepSeek-compatible HTTP server with a web chat page"),
            ("speedrun", speedrun, "the whole R1 pipeline on the built-in corpus, evaluated, with report.md"),
            ("plot", report, "training curves of runs (their metrics.jsonl) as a PNG"),
            ("export-gguf", gguf_export, "write a llama.cpp / Ollama GGUF file (weights, tokenizer, chat template)")):
        command = sub.add_parser(name, help=summary)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    chat = sub.add_parser("chat", help="interactive chat with streamed replies and visible reasoning")
    _sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    for command in sub.choices.values():
        command.allow_abbrev = False  # `--conf x` must not pass for the --config a run file is read from
        command.add_argument(CONFIG_FLAG, metavar="RUN.toml", help="settings from a TOML file: this command's "
                             "flags as keys (top level or in a [command] table); flags given here override it")
    return parser


def _apply_run_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with the settings of the command's `--config` run file before its own flags."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    name = next((token for token in argv if not token.startswith("-")), None)
    if name not in commands:  # argparse says what is wrong
        return argv
    return with_run_file(argv, name, commands[name], list(commands))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _apply_run_file(parser, argv)
    except RunFileError as exc:
        print(f"nanoseek: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError) as exc:
        print(f"nanoseek {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
