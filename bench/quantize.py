"""Weight formats side by side on one checkpoint: fp32, bf16, int8 and int4 weights (`LLM(quantize=...)`).

For each format: the weight memory, the perplexity on held-out text, greedy continuations against fp32's, and
decode speed at batch 1. The held-out text is the built-in corpus's worked solutions written for problems of
the tasks' eval split, which no training document comes from (tests/test_heldout.py). int8 and int4 keep the
rest of the model in fp32; bf16 is the whole model in bf16. Decode tok/s = (new tokens - 1) / (time for all
of them - time for one), medians of --repeats runs with the formats alternating, so that the load of a shared
machine falls on all alike.

Run: `python bench/quantize.py --model CKPT [--documents 64] [--new-tokens 64]` (a checkpoint trained on the
built-in corpus, e.g. `nanoseek pretrain --preset nano`).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek import LLM, SamplingParams  # noqa: E402
from nanoseek.r1 import ZeroLayout  # noqa: E402
from nanoseek.tasks import TASKS, make_problem  # noqa: E402
from nanoseek.tasks.corpus import textbook  # noqa: E402

FORMATS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.float32, "int8"),
           "int4": (torch.float32, "int4")}


def held_out_documents(count: int) -> list[str]:
    """Worked solutions of eval-split problems, the tasks in turn, difficulties 1-3."""
    tasks = sorted(TASKS)
    return [textbook(make_problem(tasks[i % len(tasks)], i, 1 + i % 3, "eval"), ZeroLayout()) for i in range(count)]


@torch.no_grad()
def perplexity(llm: LLM, documents: list[list[int]]) -> float:
    """exp(mean next-token cross-entropy) over every document, each a sequence of its own."""
    total, count = 0.0, 0
    for ids in documents:
        tokens = torch.tensor([ids])
        logits = llm.model(tokens).float()
        total += F.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    return math.exp(total / count)


def weight_bytes(llm: LLM) -> int:
    tensors = {id(t): t for t in [*llm.model.parameters(), *llm.model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def decode_seconds(llm: LLM, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds for one new token, seconds for `new_tokens`), greedy, EOS ignored."""
    times = []
    for new in (1, new_tokens):
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([prompt], params)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def greedy(llm: LLM, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0)
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]


def agreement(ours: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of continuations identical to the reference's, mean tokens before the first difference)."""
    same = sum(a == b for a, b in zip(ours, reference, strict=True)) / len(reference)
    prefixes = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                for a, b in zip(ours, reference, strict=True)]
    return same, statistics.mean(prefixes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory with its tokenizer")
    parser.add_argument("--documents", type=int, default=64, help="held-out documents for perplexity")
    parser.add_argument("--prompts", type=int, default=16, help="held-out questions for greedy continuations")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    llms = {name: LLM(args.model, dtype=dtype, quantize=quantize, max_num_seqs=args.prompts)
            for name, (dtype, quantize) in FORMATS.items()}
    tokenizer = llms["fp32"].tokenizer
    documents = [tokenizer.encode(text) for text in held_out_documents(args.documents)]
    prompts = [ids[: len(ids) // 3] for ids in documents[: args.prompts]]
    continuations = {name: greedy(llm, prompts, args.new_tokens) for name, llm in llms.items()}
    timings = _timings(llms, prompts[0], args.new_tokens, args.repeats)
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"model: {args.model}; {len(documents)} held-out documents ({sum(map(len, documents))} tokens); "
          f"{len(prompts)} greedy continuations of {args.new_tokens} tokens; decode at batch 1")
    base = perplexity(llms["fp32"], documents)
    base_speed = timings["fp32"]
    print("| format | weights | perplexity | vs fp32 | greedy identical | common prefix (tokens) | "
          "decode tok/s | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, llm in llms.items():
        ppl = base if name == "fp32" else perplexity(llm, documents)
        same, prefix = agreement(continuations[name], continuations["fp32"])
        print(f"| {name} | {weight_bytes(llm) / 2**20:.1f} MiB | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% | "
              f"{100 * same:.0f}% | {prefix:.1f} | {timings[name]:.1f} | {timings[name] / base_speed:.2f}x |")


def _timings(llms: dict[str, LLM], prompt: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    """format -> decode tok/s at batch 1: medians of `repeats` runs, the formats alternating."""
    for llm in llms.values():
        decode_seconds(llm, prompt, 4)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in llms}
    for _ in range(repeats):
        for name, llm in llms.items():
            runs[name].append(decode_seconds(llm, prompt, new_tokens))
    return {name: (new_tokens - 1) / (statistics.median(t[1] for t in times) - statistics.median(t[0] for t in times))
            for name, times in runs.items()}


if __name__ == "__main__":
    main()
