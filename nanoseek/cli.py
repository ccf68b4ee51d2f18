"""The `nanoseek` command line: `nanoseek --help` lists the commands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import PRESETS, ConfigError, ModelConfig, preset
from .sizing import forward_flops_per_token, human, kv_cache_bytes_per_token, parameter_counts

# Figures DeepSeek published, printed beside ours for the presets that reproduce a released model.
PUBLISHED = {
    "deepseek-v3": "published: 671B total, 37B activated (V3 paper); 36.6B activated incl. the head and 11.5B "
                   "MTP (README_WEIGHTS.md)",
    "deepseek-v2-lite": "published: 15.7B total, 2.4B activated (DeepSeek-V2 report)",
}


def _load_config(args: argparse.Namespace) -> tuple[ModelConfig, str]:
    if args.preset:
        return preset(args.preset), f"preset {args.preset}"
    path = Path(args.model)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.exists():
        raise ConfigError(f"{path}: no config.json; give a checkpoint directory, a config.json or --preset")
    return ModelConfig.from_json_file(config_file), str(path)


def cmd_info(args: argparse.Namespace) -> int:
    """Sizes from the config alone: parameters, KV cache, FLOPs. Never allocates the weights."""
    config, source = _load_config(args)
    counts = parameter_counts(config)
    latent, expanded = kv_cache_bytes_per_token(config, args.cache_bytes)
    weight_flops, attention_flops = forward_flops_per_token(config, args.context)
    report = {
        "model": source,
        "parameters": counts.total, "activated_parameters": counts.activated,
        "mtp_modules": config.num_nextn_predict_layers,
        "mtp_parameters": counts.mtp_total, "mtp_activated_parameters": counts.mtp_activated,
        "kv_cache_bytes_per_token": latent, "mha_kv_cache_bytes_per_token": expanded,
        "kv_cache_ratio": expanded / latent,
        "forward_flops_per_token": weight_flops + attention_flops,
        "weight_flops_per_token": weight_flops, "attention_flops_per_token": attention_flops,
        "context": args.context, "cache_dtype_bytes": args.cache_bytes,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    c = config
    lines = [
        f"model             {source}",
        f"parameters        {human(counts.total)} total, {human(counts.activated)} activated per token "
        f"({100 * counts.activated / counts.total:.1f}%)",
        f"MTP modules       {c.num_nextn_predict_layers}: {human(counts.mtp_total)} own parameters, "
        f"{human(counts.mtp_activated)} activated per token (embedding and head shared with the main model)",
        f"KV cache / token  latent {human(latent, 'B')} ({c.kv_lora_rank} + {c.qk_rope_head_dim} values x "
        f"{c.num_hidden_layers} layers x {args.cache_bytes} bytes) vs expanded multi-head {human(expanded, 'B')}: "
        f"{expanded / latent:.1f}x smaller",
        f"forward FLOPs     {human(weight_flops + attention_flops, 'FLOP')} per token at {args.context} tokens of "
        f"context ({human(weight_flops, 'FLOP')} weights + {human(attention_flops, 'FLOP')} attention)",
    ]
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
    info = argparse.Namespace(preset=None, model=str(out), context=args.tokens, cache_bytes=4, json=False)
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
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="build a model, save and reload it, run a forward pass and a cached decode")
    demo.add_argument("--preset", choices=["tiny", "nano", "small"], default="nano")
    demo.add_argument("--out", default="runs/demo", help="checkpoint directory to write")
    demo.add_argument("--tokens", type=int, default=64, help="sequence length of the check")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError) as exc:
        print(f"nanoseek {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
