"""Decode and prefill throughput, nanoseek's engine against transformers' `generate`, on one checkpoint.

The checkpoint has random weights in the DESIGN.md reference config (`small` preset) unless --model names one.
Greedy decoding of 64-token prompts, 128 new tokens (EOS ignored), at batch 1 and batch 16. Decode tok/s =
batch x (128 - 1) / (time for 128 new tokens - time for 1), so prefill does not count; prefill tok/s =
batch x 64 / time for 1 new token. Medians of --repeats runs, nanoseek and transformers alternating.
KV-cache bytes per token are measured from the caches each keeps after a run. MTP speculation is reported
on the same checkpoint (random weights accept few drafts: the speedup needs a trained MTP module).

Run: `python bench/decode.py [--model DIR] [--new-tokens 128] [--batches 1 16]`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoseek  # noqa: E402
from nanoseek import LLM, SamplingParams  # noqa: E402


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hf_cache_bytes_per_token(model, ids: torch.Tensor) -> float:
    out = model.generate(ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True, eos_token_id=None,
                         pad_token_id=0)
    cache = out.past_key_values
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors) / (ids.shape[0] * ids.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: random `small` weights)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, medians reported")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    from transformers import DeepseekV3ForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tmp = tempfile.TemporaryDirectory()
    path = args.model
    if path is None:
        torch.manual_seed(0)
        path = tmp.name
        nanoseek.CausalLM(nanoseek.preset("small")).save_pretrained(path)
    config = nanoseek.load_model(path).config
    max_batch = max(args.batches)
    length = args.prompt_tokens + args.new_tokens + 8
    llm = LLM(path, device=device, dtype=dtype, max_num_seqs=max_batch, max_model_len=length)
    hf = None if args.skip_transformers else DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, config.vocab_size, (max_batch, args.prompt_tokens), generator=gen)

    def ours(batch: int, new: int) -> float:
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        return seconds(lambda: llm.generate(prompts[:batch].tolist(), params))

    def theirs(batch: int, new: int) -> float:
        ids = prompts[:batch].to(device)
        return seconds(lambda: hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                           eos_token_id=None, pad_token_id=0))

    runners = {"nanoseek": ours} if hf is None else {"nanoseek": ours, "transformers": theirs}
    rows = [(batch, _timed(runners, batch, args.new_tokens, args.prompt_tokens, args.repeats))
            for batch in args.batches]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, {device.type}, {dtype}, "
          f"torch {torch.__version__}")
    print(f"model: {path if args.model else 'random small preset'}; prompts {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, greedy")
    print(f"{'batch':>5} {'transformers decode':>20} {'nanoseek decode':>16} {'ratio':>7} "
          f"{'transformers prefill':>21} {'nanoseek prefill':>17} {'ratio':>7}")
    for batch, result in rows:
        ns_dec, ns_pre = result["nanoseek"]
        hf_dec, hf_pre = result.get("transformers", (float("nan"), float("nan")))
        print(f"{batch:>5} {hf_dec:>16.1f} t/s {ns_dec:>12.1f} t/s {ns_dec / hf_dec:>6.2f}x "
              f"{hf_pre:>17.0f} t/s {ns_pre:>13.0f} t/s {ns_pre / hf_pre:>6.2f}x")
    ours_bytes = llm.runner.cache.bytes_per_token()
    line = f"KV cache bytes/token: nanoseek {ours_bytes} (formula {(config.kv_cache_dim) * config.num_hidden_layers}" \
           f" x {torch.empty(0, dtype=dtype).element_size()} B)"
    if hf is not None:
        line += f", transformers {hf_cache_bytes_per_token(hf, prompts[:1].to(device)):.0f}"
    print(line)
    if len(llm.model.mtp):
        _speculation(llm, LLM(path, device=device, dtype=dtype, max_num_seqs=1, max_model_len=length,
                              speculative=True), prompts[:4].tolist(), args.new_tokens)


def _timed(runners: dict, batch: int, new_tokens: int, prompt_tokens: int, repeats: int) -> dict:
    """name -> (decode tok/s, prefill tok/s) at `batch`: medians of `repeats` alternating runs."""
    for run in runners.values():
        run(batch, 2)  # warm-up
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runners}
    for _ in range(repeats):  # alternate the two, so the load of a shared machine falls on both alike
        for name, run in runners.items():
            times[name][0].append(run(batch, 1))
            times[name][1].append(run(batch, new_tokens))
    result = {}
    for name, (ones, fulls) in times.items():
        one, full = statistics.median(ones), statistics.median(fulls)
        result[name] = (batch * (new_tokens - 1) / (full - one), batch * prompt_tokens / one)
    return result


def _speculation(llm: LLM, spec: LLM, fallback: list[list[int]], new_tokens: int) -> None:
    """MTP self-speculation against plain decode at batch 1, one prompt at a time."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    spec_prompts = _spec_prompts(llm, fallback)
    plain_s = spec_s = 0.0
    drafted = accepted = 0
    for prompt in spec_prompts:
        plain_s += seconds(lambda p=prompt: llm.generate([p], params))
        start = time.perf_counter()
        metrics = spec.generate([prompt], params)[0].metrics
        spec_s += time.perf_counter() - start
        drafted += metrics["draft_tokens"]
        accepted += metrics["accepted_tokens"]
    kind = "questions of the built-in corpus" if llm.tokenizer else "random prompts"
    print(f"MTP speculation, batch 1, {len(spec_prompts)} {kind}: {plain_s / spec_s:.2f}x plain decode, "
          f"acceptance {100 * accepted / max(1, drafted):.0f}% ({accepted}/{drafted} drafts)")


def _spec_prompts(llm: LLM, fallback: list[list[int]]) -> list:
    """In-distribution prompts for a model trained on the built-in corpus (its acceptance is what matters)."""
    if llm.tokenizer is None:
        return fallback
    from nanoseek.r1 import ZERO_PROMPT
    from nanoseek.tasks.corpus import generate_corpus

    questions = [doc.split("\n")[0].removeprefix("User: ") for doc in generate_corpus(len(fallback), seed=12345)]
    return [ZERO_PROMPT.format(question=q) for q in questions]


if __name__ == "__main__":
    main()
