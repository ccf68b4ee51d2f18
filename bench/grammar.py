"""Grammar masks, llguidance against xgrammar: the choice behind `nanoseek/engine/structured.py`.

Both libraries walk the same token sequence under the same JSON schema and tokenizer: the sequence is drawn
once at random under llguidance's masks (every token allowed by the grammar), then each library computes the
mask before every token of it. Reported per library and vocabulary: the one-off costs (the tokenizer's tables,
compiling the schema) and the mask time per token (median and p99), and whether both allowed every token.
Tokenizers are nanoseek's byte-level BPE, trained on the built-in corpus (8,192 tokens, the `nano` config's)
and, for vocabularies of DeepSeek's size (129,280), on 40 MB of the Python sources installed beside torch.
xgrammar is a benchmark-only dependency: `pip install xgrammar`.

Run: `python bench/grammar.py [--vocab 32768 131072] [--tokens 300]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.engine.structured import JSON_OPTIONS  # noqa: E402
from nanoseek.tasks.corpus import generate_corpus  # noqa: E402
from nanoseek.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "count": {"type": "integer"}, "ok": {"type": "boolean"},
    "items": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"},
                                                                         "label": {"type": "string"}},
                                         "required": ["id", "label"], "additionalProperties": False}}},
    "required": ["name", "count", "ok", "items"], "additionalProperties": False}


def draw_tokens(tokenizer: Tokenizer, vocab: int, length: int) -> list[int]:
    """A token sequence the schema allows, drawn uniformly among the allowed tokens at each step."""
    from llguidance import LLMatcher, LLTokenizer
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

    matcher = LLMatcher(LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab, eos_token=tokenizer.eos_token_id),
                        LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_OPTIONS))
    generator, tokens = torch.Generator().manual_seed(0), []
    mask = allocate_token_bitmask(1, vocab)
    while len(tokens) < length and not matcher.is_stopped():
        fill_next_token_bitmask(matcher, mask)
        allowed = ((mask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab].bool()
        allowed[tokenizer.eos_token_id] = False
        if not allowed.any():
            break
        token = int(torch.multinomial(allowed.float(), 1, generator=generator))
        matcher.consume_token(token)
        tokens.append(token)
    return tokens


def time_llguidance(tokenizer: Tokenizer, vocab: int, tokens: list[int]) -> dict:
    from llguidance import LLMatcher, LLTokenizer
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

    start = time.perf_counter()
    table = LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab, eos_token=tokenizer.eos_token_id)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    matcher = LLMatcher(table, LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_OPTIONS))
    compile_s = time.perf_counter() - start
    mask, times, agreed = allocate_token_bitmask(1, vocab), [], True
    for token in tokens:
        start = time.perf_counter()
        fill_next_token_bitmask(matcher, mask)
        times.append(time.perf_counter() - start)
        agreed &= bool((int(mask[0, token // 32]) >> (token % 32)) & 1)
        matcher.consume_token(token)
    return {"setup": setup, "compile": compile_s, "times": times, "agreed": agreed}


def time_xgrammar(tokenizer: Tokenizer, vocab: int, tokens: list[int]) -> dict:
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    start = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token="<|end_of_text|>")
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compiler = xgrammar.GrammarCompiler(info)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - start
    matcher = xgrammar.GrammarMatcher(compiled)
    mask, times, agreed = xgrammar.allocate_token_bitmask(1, vocab), [], True
    for token in tokens:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - start)
        agreed &= bool((int(mask[0, token // 32]) >> (token % 32)) & 1)
        agreed &= matcher.accept_token(token)
    return {"setup": setup, "compile": compile_s, "times": times, "agreed": agreed}


def python_sources(chars: int) -> list[str]:
    """About `chars` characters of the Python files installed beside torch: varied text to train a large BPE on,
    offline."""
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py")):
        texts.append(path.read_text(errors="ignore"))
        total += len(texts[-1])
        if total >= chars:
            break
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072],
                        help="vocabularies trained on the Python sources")
    parser.add_argument("--tokens", type=int, default=300)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}")
    corpora = [(list(generate_corpus(20000)), 8192)] + [(python_sources(40_000_000), v) for v in args.vocab]
    for corpus, vocab in corpora:
        tokenizer = train_tokenizer(corpus, vocab)
        size = tokenizer.vocab_size
        tokens = draw_tokens(tokenizer, size, args.tokens)
        for name, run in (("llguidance", time_llguidance), ("xgrammar", time_xgrammar)):
            try:
                result = run(tokenizer, size, tokens)
            except ImportError as exc:
                print(f"vocab {size}: {name} not installed ({exc})")
                continue
            per_token = sorted(result["times"])
            p99 = per_token[min(len(per_token) - 1, int(0.99 * len(per_token)))]
            print(f"vocab {size}, {len(tokens)} tokens: {name}: tables {result['setup'] * 1e3:.0f} ms, schema "
                  f"{result['compile'] * 1e3:.1f} ms, mask per token median {statistics.median(per_token) * 1e6:.0f}"
                  f" us, p99 {p99 * 1e6:.0f} us, total {sum(per_token) * 1e3:.1f} ms; every token allowed: "
                  f"{result['agreed']}")


if __name__ == "__main__":
    main()
