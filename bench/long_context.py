"""Long context: DeepSeek Sparse Attention (DeepSeek-V3.2) against dense MLA on the same model.

The model is the `small` config (random weights, positions to 128K by YaRN) with a lightning indexer of
V3.2's proportions, made by `add_indexer`'s defaults: 2 heads of 64, a ninth of the absorbed attention's
8 x (128 + 32) values per key, as V3.2's 64 x 128 is of 128 x (512 + 64); top-2048 keys. The dense model is
the same weights without the indexer. At each context L:

* decode: batch 1, the cache holding L random latents (and indexer keys), then --new-tokens greedy steps
  timed (the whole model); tok/s, and the fraction of the bandwidth floor: the bytes a step must read
  (activated weights, the latents it attends over, the indexer keys) at a bandwidth measured in the run.
* prefill: L tokens into the cache in --prefill-chunk pieces, as the engine schedules a long prompt (dense:
  the expanded heads over every earlier key; sparse: the indexer over every earlier key, attention over the
  gathered top-k); seconds, and the fraction of the compute floor (its multiply-adds at a matmul rate measured
  in the run). One forward over 32K tokens without a cache would need the dense scores whole: SDPA has no
  fused CPU kernel for MLA's unequal key and value widths.
* the parts of one decode step in layer 0, alone: the indexer (scores and top-k) and the sparse attention
  over k gathered latents, beside dense attention over all L: the indexer and dense attention grow with L,
  the sparse attention stays flat.

Medians of --repeats runs (prefill past 8K: one), sparse and dense alternating, after one untimed run of
each at 4K. `--index-dtype int8` keeps the sparse model's indexer keys as the engine's `--index-cache-dtype
int8` does; `--compile` decodes with the compiled steps. Run: `python bench/long_context.py [--contexts 2048
8192 32768 65536] [--new-tokens 16] [--index-dtype int8] [--compile]`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoseek  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.model import CausalLM, LatentCache, add_indexer  # noqa: E402
from nanoseek.model.indexer import quantize_int8  # noqa: E402
from nanoseek.sizing import parameter_counts  # noqa: E402


def seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternating(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each run, the runs taking turns (so that a slower spell of the machine hits both)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(seconds(fn, 1))
    return {name: statistics.median(t) for name, t in times.items()}


def bandwidth() -> float:
    """Bytes per second this machine streams: the sum of a 512 MiB tensor."""
    data = torch.ones(1 << 27)
    data.sum()
    return data.numel() * 4 / seconds(data.sum, 5)


def matmul_rate() -> float:
    """Multiply-adds per second of a large fp32 matmul."""
    a = torch.randn(2048, 2048)
    a @ a
    return 2048**3 / seconds(lambda: a @ a, 5)


def models(max_len: int) -> tuple[CausalLM, CausalLM]:
    """(sparse, dense): the same `small` weights with and without the indexer."""
    torch.manual_seed(0)
    yarn = {"type": "yarn", "factor": 32, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096}
    config = nanoseek.preset("small", max_position_embeddings=max(max_len, 4096 * 32), rope_scaling=yarn,
                             num_nextn_predict_layers=0)
    dense = CausalLM(config).eval()
    return add_indexer(dense).eval(), dense


def one_slot_cache(model: CausalLM, length: int, index_dtype: torch.dtype | None) -> LatentCache:
    """A one-sequence cache; `index_dtype` applies to the sparse model's indexer keys (the dense one has none)."""
    return model.new_cache(1, length, index_dtype=index_dtype if model.config.index_cache_dim else None)


def filled_cache(model: CausalLM, context: int, extra: int, index_dtype: torch.dtype | None) -> LatentCache:
    """A one-slot cache whose first `context` positions hold unit-variance random latents and indexer keys
    (the scale of the normalised c_kv and of the LayerNorm'd keys): what decoding at that context reads."""
    cache = one_slot_cache(model, context + extra, index_dtype)
    cache.data[:, :, :context].normal_()
    if cache.index is not None:
        keys = torch.randn(*cache.index.shape[:2], context, cache.index.shape[-1])
        if cache.index_scale is None:
            cache.index[:, :, :context] = keys
        else:
            cache.index[:, :, :context], cache.index_scale[:, :, :context] = quantize_int8(keys)
    return cache


def decode_steps(model: CausalLM, context: int, new: int, index_dtype: torch.dtype | None) -> Callable[[], None]:
    """`new` batch-1 decode steps at positions context, context + 1, ...; the first run warms up."""
    cache = filled_cache(model, context, new, index_dtype)
    ids = torch.randint(2, model.config.vocab_size, (1, 1))

    @torch.no_grad()
    def run() -> None:
        for step in range(new):
            model(ids, torch.tensor([[context + step]]), cache)

    run()
    return run


def prefill(model: CausalLM, context: int, chunk: int, index_dtype: torch.dtype | None) -> Callable[[], None]:
    """`context` tokens into a cache, `chunk` at a time (as the engine's scheduler splits a long prompt), logits
    at each chunk's last position only."""
    ids = torch.randint(2, model.config.vocab_size, (1, context))
    cache = one_slot_cache(model, context, index_dtype)

    @torch.no_grad()
    def run() -> None:
        for start in range(0, context, chunk):
            stop = min(context, start + chunk)
            model.run(ids[:, start:stop], torch.arange(start, stop)[None], cache,
                      logits_index=torch.tensor([[stop - start - 1]]))

    return run


def decode_parts(sparse: CausalLM, context: int, repeats: int, index_dtype: torch.dtype | None) -> dict[str, float]:
    """Milliseconds of one decode step's indexer, sparse attention and dense attention in layer 0."""
    attn, c = sparse.model.layers[0].self_attn, sparse.config
    x, q_compressed = torch.randn(1, 1, c.hidden_size), torch.randn(1, 1, c.q_lora_rank)
    cos, sin = sparse.rotary(torch.tensor([[context]]), x.dtype)
    latents, index_keys = torch.randn(1, context, c.kv_cache_dim), torch.randn(1, context, c.index_head_dim)
    if index_dtype is not None:
        index_keys = quantize_int8(index_keys)
    q_nope = torch.randn(1, 1, c.num_attention_heads, c.qk_nope_head_dim)
    q_pe = torch.randn(1, 1, c.num_attention_heads, c.qk_rope_head_dim)

    def index() -> torch.Tensor:
        return attn.indexer.top_keys(attn.indexer.scores(x, q_compressed, cos, sin, index_keys), None)[0]

    with torch.no_grad():
        chosen = index()
        valid = torch.ones_like(chosen, dtype=torch.bool)
        parts = {"indexer": lambda: index(), "sparse attention": lambda: attn._attend_chosen(
            q_nope, q_pe, latents, chosen, valid), "dense attention": lambda: attn._absorbed(
            q_nope, q_pe, latents, None, False)}
        return {name: 1e3 * seconds(fn, repeats * 10) for name, fn in parts.items()}


def decode_bytes(config: ModelConfig, context: int, index_dtype: torch.dtype | None) -> int:
    """What one batch-1 decode step must read, fp32: activated weights, the latents attended, indexer keys
    (int8: a byte per value and a 4-byte scale per key)."""
    weights = 4 * parameter_counts(config).activated
    if not config.index_cache_dim:
        return weights + 4 * config.num_hidden_layers * context * config.kv_cache_dim
    index = config.index_head_dim + 4 if index_dtype is not None else 4 * config.index_head_dim  # per key
    attended = min(context, config.index_topk)
    return weights + config.num_hidden_layers * context * index + 4 * config.num_hidden_layers * attended * \
        config.kv_cache_dim


def prefill_macs(config: ModelConfig, context: int) -> float:
    """Multiply-adds of a forward over `context` tokens: activated weights, then attention (dense, and a V3.2
    model within index_topk: causal QK^T and PV of the expanded heads; sparse: the indexer over every earlier
    key, the absorbed attention over k)."""
    c, pairs = config, context * (context + 1) / 2
    weights = parameter_counts(c).activated * context
    heads = c.num_attention_heads
    if not c.index_cache_dim or context <= c.index_topk:
        return weights + c.num_hidden_layers * pairs * heads * (c.qk_head_dim + c.v_head_dim)
    keys = sum(min(p + 1, c.index_topk) for p in range(context))
    indexer = pairs * c.index_n_heads * c.index_head_dim
    attention = keys * heads * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
    return weights + c.num_hidden_layers * (indexer + attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    parser.add_argument("--prefill-contexts", type=int, nargs="*", help="contexts whose prefill is timed too "
                        "(default: all; dense prefill is O(L^2): tens of minutes at 64K on 2 cores)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, default=1024, help="tokens per prefill forward")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (prefill past 8K: one)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--index-dtype", choices=["float32", "int8"], default="float32", help="the sparse "
                        "model's indexer keys in the cache (int8: one scale per key, int8 dot products; V3.2 "
                        "deploys them in FP8)")
    parser.add_argument("--compile", action="store_true", help="decode with the compiled steps "
                        "(`LanguageModel.compile_decode`, as `LLM(compile=True)`): less time outside attention")
    args = parser.parse_args()
    index_dtype = torch.int8 if args.index_dtype == "int8" else None
    torch.set_num_threads(args.threads)
    sparse, dense = models(max(args.contexts) + args.new_tokens)
    if args.compile:
        sparse.compile_decode(), dense.compile_decode()
    c = sparse.config
    rate, stream = matmul_rate(), bandwidth()
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"{stream / 1e9:.1f} GB/s streamed, {2 * rate / 1e9:.0f} GFLOP/s fp32 matmul")
    print(f"model: small config, {parameter_counts(c).activated / 1e6:.1f}M activated; indexer {c.index_n_heads} "
          f"heads x {c.index_head_dim}, top-{c.index_topk}, {args.index_dtype} keys; fp32, batch 1, "
          f"{args.new_tokens} decode steps"
          f"{', compiled' if args.compile else ', eager'}")
    print("| context | decode sparse tok/s (floor) | dense tok/s (floor) | ratio | prefill sparse s (floor) | "
          "dense s (floor) | ratio | layer-0 step: indexer / sparse attn / dense attn ms |")
    print("|---|---|---|---|---|---|---|---|")
    both = {"sparse": sparse, "dense": dense}
    alternating({name: prefill(m, 4096, args.prefill_chunk, index_dtype) for name, m in both.items()}, 1)  # warm-up
    for context in args.contexts:
        steps = alternating({name: decode_steps(m, context, args.new_tokens, index_dtype) for name, m in both.items()},
                            args.repeats)
        tok_s = {name: args.new_tokens / s for name, s in steps.items()}
        floors = {name: stream / decode_bytes(m.config, context, index_dtype) for name, m in both.items()}
        repeats = args.repeats if context <= 8192 else 1
        timed = args.prefill_contexts is None or context in args.prefill_contexts
        prefill_s = alternating({name: prefill(m, context, args.prefill_chunk, index_dtype)
                                 for name, m in both.items()}, repeats) if timed else None
        limits = {name: prefill_macs(m.config, context) / rate for name, m in both.items()}
        parts = decode_parts(sparse, context, args.repeats, index_dtype)
        print(f"| {context:,} | {tok_s['sparse']:.1f} ({100 * tok_s['sparse'] / floors['sparse']:.0f}%) | "
              f"{tok_s['dense']:.1f} ({100 * tok_s['dense'] / floors['dense']:.0f}%) | "
              f"{tok_s['sparse'] / tok_s['dense']:.2f}x | {prefill_cells(prefill_s, limits)} | "
              f"{parts['indexer']:.2f} / {parts['sparse attention']:.2f} / {parts['dense attention']:.2f} |",
              flush=True)


def prefill_cells(seconds: dict[str, float] | None, limits: dict[str, float]) -> str:
    """The table's three prefill cells: sparse and dense seconds (with their fraction of the floor), ratio."""
    if seconds is None:
        return "not run | not run | not run"
    return (f"{seconds['sparse']:.2f} ({100 * limits['sparse'] / seconds['sparse']:.0f}%) | {seconds['dense']:.2f} "
            f"({100 * limits['dense'] / seconds['dense']:.0f}%) | {seconds['dense'] / seconds['sparse']:.2f}x")


if __name__ == "__main__":
    main()
