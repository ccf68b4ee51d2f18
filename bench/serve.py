"""Serving throughput: the same chat requests sent by 32 concurrent streaming clients, and one at a time.

`nanoseek serve` runs as a subprocess on 127.0.0.1; the official `openai` client sends 32 clients x 4
requests (distinct prompts, --max-tokens new tokens each, EOS ignored so every request does the same work),
first all at once (each client sends its next request when the previous one ends), then the same 128
requests one after another. Reported: aggregate output tokens/s of each and their ratio (target >= 6x,
DESIGN.md), and client-side TTFT and inter-token latency percentiles under load. Then the cost of structured
outputs: the 32 clients again, without a think block, free and under a JSON schema (`response_format`), with
the grammar's share of the run from the server's metrics (target: constrained >= 85% of free throughput).

The checkpoint has random `nano` weights and a tokenizer trained on the built-in corpus unless --model
names one. Run: `python bench/serve.py [--model DIR] [--clients 32] [--requests 4] [--max-tokens 64]`.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek import CausalLM  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.tasks.corpus import generate_corpus  # noqa: E402
from nanoseek.tokenizer import train_tokenizer  # noqa: E402

MODEL = "bench"


def random_checkpoint(path: Path) -> Path:
    config = preset("nano")
    train_tokenizer(generate_corpus(2000), config.vocab_size).save(path)
    torch.manual_seed(0)
    CausalLM(config).save_pretrained(path)
    return path


def start_server(model: str, max_num_seqs: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", model, "--port", str(port),
                                "--served-model-name", MODEL, "--max-num-seqs", str(max_num_seqs)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(base + "/health", timeout=1):
                return process, base
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


# a JSON object with one long string: every step of a random model's reply stays under the grammar
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
          "additionalProperties": False}
FREE = {"thinking": {"type": "disabled"}}
CONSTRAINED = {**FREE, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}


async def one_request(client: openai.AsyncOpenAI, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
    start = time.perf_counter()
    stamps, tokens = [], 0
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, **(extra or {})}, temperature=0.6)
    async for chunk in stream:
        if chunk.choices and (chunk.choices[0].delta.content or getattr(chunk.choices[0].delta,
                                                                          "reasoning_content", None)):
            stamps.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"ttft": stamps[0] - start if stamps else float("nan"),
            "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)], "tokens": tokens}


async def concurrent(base: str, prompts: list[list[str]], max_tokens: int,
                     extra: dict | None = None) -> tuple[float, list[dict]]:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)

    async def user(mine: list[str]) -> list[dict]:
        return [await one_request(client, prompt, max_tokens, extra) for prompt in mine]

    start = time.perf_counter()
    results = await asyncio.gather(*(user(mine) for mine in prompts))
    return time.perf_counter() - start, [r for rs in results for r in rs]


async def sequential(base: str, prompts: list[list[str]], max_tokens: int) -> tuple[float, list[dict]]:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
    start = time.perf_counter()
    results = [await one_request(client, prompt, max_tokens) for mine in prompts for prompt in mine]
    return time.perf_counter() - start, results


def percentiles(values: list[float]) -> str:
    values = sorted(values)
    pick = [values[min(len(values) - 1, int(q * len(values)))] * 1000 for q in (0.5, 0.9, 0.99)]
    return "p50 {:.0f} ms, p90 {:.0f} ms, p99 {:.0f} ms".format(*pick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: random nano weights)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    model = args.model or str(random_checkpoint(Path(tmp.name) / "nano"))
    prompts = [[f"What is {c} + {r} * {c + r}? Think step by step." for r in range(args.requests)]
               for c in range(args.clients)]
    process, base = start_server(model, args.clients)
    try:
        asyncio.run(sequential(base, [prompts[0][:2]], args.max_tokens))  # warm-up
        together_s, loaded = asyncio.run(concurrent(base, prompts, args.max_tokens))
        alone_s, single = asyncio.run(sequential(base, prompts, args.max_tokens))
        structured = structured_cost(base, prompts, args.max_tokens)
    finally:
        process.terminate()
        process.wait()
    total = sum(r["tokens"] for r in loaded)
    assert total == sum(r["tokens"] for r in single) == args.clients * args.requests * args.max_tokens
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; model {model if args.model else 'random nano'}")
    print(f"{args.clients} clients x {args.requests} requests x {args.max_tokens} tokens = {total} tokens")
    print(f"concurrent: {together_s:.1f} s, {total / together_s:.0f} tok/s; TTFT "
          f"{percentiles([r['ttft'] for r in loaded])}; ITL {percentiles([x for r in loaded for x in r['itl']])}")
    print(f"one at a time: {alone_s:.1f} s, {total / alone_s:.0f} tok/s; TTFT "
          f"{percentiles([r['ttft'] for r in single])}; ITL {percentiles([x for r in single for x in r['itl']])}")
    print(f"ratio: {alone_s / together_s:.2f}x (target >= 6x)")
    print(f"median ITL under load {statistics.median(x for r in loaded for x in r['itl']) * 1000:.1f} ms")
    print(structured)


def grammar_seconds(base: str) -> float:
    """The server's total time computing grammar masks (its Prometheus histogram's sum)."""
    with urllib.request.urlopen(base + "/metrics") as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("nanoseek_grammar_mask_seconds_sum"))


def structured_cost(base: str, prompts: list[list[str]], max_tokens: int) -> str:
    """The 32 clients free and then under a JSON schema, both without a think block; tok/s of each."""
    rates = {}
    for name, extra in (("free", FREE), ("json_schema", CONSTRAINED), ("free again", FREE)):
        before = grammar_seconds(base)
        seconds, results = asyncio.run(concurrent(base, prompts, max_tokens, extra))
        rates[name] = (sum(r["tokens"] for r in results) / seconds, seconds, grammar_seconds(base) - before)
    free = (rates["free"][0] + rates["free again"][0]) / 2
    rate, seconds, masks = rates["json_schema"]
    return (f"structured outputs, {len(prompts)} concurrent clients, no think block: free {rates['free'][0]:.0f} "
            f"and {rates['free again'][0]:.0f} tok/s; json_schema {rate:.0f} tok/s = {rate / free:.1%} of free "
            f"(target >= 85%); grammar masks {masks:.2f} s of its {seconds:.1f} s")


if __name__ == "__main__":
    main()
