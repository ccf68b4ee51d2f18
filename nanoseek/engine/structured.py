"""Structured outputs: a grammar per sequence, applied as a token mask in the one sampler (llguidance).

A `StructuredOutput` (vLLM's StructuredOutputsParams) says what a completion must match: a JSON schema, a
regular expression, one of several strings, or a Lark grammar (llguidance's dialect, which can embed JSON
schemas). `Grammars` compiles one into a matcher over the model's vocabulary; before each sampling step the
runner asks every constrained sequence's matcher which tokens may come next (`allowed`) and masks the others,
and each token taken is fed back (`Constraint.consume`), so the output matches whatever the weights say.

llguidance over xgrammar, by measurement (`bench/grammar.py`, one JSON schema walked by both, 2-core CPU): at a
131K vocabulary (DeepSeek's is 129,280) llguidance's mask takes 3 us at the median and 2.3 ms over 300 tokens
against xgrammar's 97 us and 27.8 ms, and compiles the schema in 1.3 ms against 27 ms (each tool-calling request
brings its own); at 8K the two are even. It also reads `tokenizer.json` as it is and needs nothing else.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from llguidance import LLExecutor, LLMatcher, LLTokenizer
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par
from torch import Tensor

from ..tokenizer import Tokenizer
from .errors import EngineError

VALIDATED_GRAMMARS = 256  # grammars remembered as valid (a set, cleared when full; shared by threads)
# JSON without free whitespace: a random or weak model could otherwise pad forever between two tokens
JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class StructuredOutput:
    """Exactly one of `json`, `regex`, `choice`, `grammar`. `after`: a token id the constraint waits for,
    free text before it (an R1 reply's think block, closed by `</think>`, comes before the JSON or tool call);
    `after_within`: the most tokens of free text, after which `after` is the only token allowed (a reasoning
    budget, so that even a model that would think on past its token limit gets to the grammar)."""

    json: dict[str, Any] | None = None  # a JSON schema; {"type": "object"} is any JSON object
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    after: int | None = None
    after_within: int | None = None

    def grammar_text(self) -> str:
        """The llguidance grammar; EngineError (param `structured`) when the request is malformed."""
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if len(given) != 1:
            raise EngineError(f"SamplingParams.structured: give exactly one of json, regex, choice, grammar "
                              f"(got {', '.join(given) or 'none'})", "structured")
        try:
            if self.json is not None:
                return LLMatcher.grammar_from_json_schema(self.json, defaults=JSON_OPTIONS)
            if self.regex is not None:
                return LLMatcher.grammar_from_regex(self.regex)
            if self.choice is not None:
                if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                    raise EngineError("SamplingParams.structured.choice: must be non-empty strings", "structured")
                return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
            return LLMatcher.grammar_from_lark(self.grammar)
        except (ValueError, TypeError) as exc:  # a schema llguidance cannot read
            raise EngineError(f"SamplingParams.structured: {exc}", "structured") from exc


@dataclass
class Constraint:
    """One sequence's matcher, and whether its grammar has started (see StructuredOutput.after)."""

    matcher: LLMatcher
    after: int | None
    within: int | None = None
    active: bool = field(init=False)
    waited: int = 0  # tokens of free text so far

    def __post_init__(self) -> None:
        self.active = self.after is None

    def must_start(self, ahead: int = 0) -> bool:
        """Whether the free text is used up `ahead` tokens from now: only `after` may come next."""
        return not self.active and self.within is not None and self.waited + ahead >= self.within

    def consume(self, token: int) -> bool:
        """Take a token; False if the grammar refuses it (the mask allows none such: a defect, which ends that
        one sequence rather than the engine)."""
        if not self.active:
            self.active, self.waited = token == self.after, self.waited + 1
            return True
        return self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """The grammar is matched and allows nothing more: the sequence ends here."""
        return self.active and self.matcher.is_stopped()


class Grammars:
    """Compiles StructuredOutputs into matchers over one tokenizer and vocabulary. The tokenizer's token
    table is built on first use (about a second for a 129K vocabulary), then shared by every matcher."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, eos_ids: set[int]):
        self._source, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self._tokenizer: LLTokenizer | None = None
        self._executor: LLExecutor | None = None  # its threads fill the masks of a batch's rows in parallel
        self._valid: set[str] = set()  # grammars validated lately
        self.mask_seconds = 0.0  # time spent computing masks, for the server's metrics

    @property
    def tokenizer(self) -> LLTokenizer:
        if self._source is None:
            raise EngineError("SamplingParams.structured: needs a tokenizer and this model has none", "structured")
        if self._tokenizer is None:
            # the larger of the two: a tokenizer may have tokens past the model's rows (never sampled) or
            # the model rows past the tokenizer's tokens (padding); masks are cut to the model's rows
            size = max(self.vocab_size, self._source.vocab_size)
            try:
                self._tokenizer = LLTokenizer(self._source.backend.to_str(), n_vocab=size, eos_token=self.eos_ids)
            except ValueError as exc:
                raise EngineError(f"SamplingParams.structured: cannot read the tokenizer ({exc})",
                                  "structured") from exc
        return self._tokenizer

    def check(self, structured: StructuredOutput) -> str:
        """The grammar, validated against the vocabulary (once: a request is checked by the server, then by
        the engine, before its matchers are built)."""
        grammar = structured.grammar_text()
        if grammar in self._valid:
            return grammar
        try:
            is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        except (ValueError, RuntimeError) as exc:  # what llguidance raises for a grammar it cannot take
            raise EngineError(f"SamplingParams.structured: {exc}", "structured") from exc
        if is_error:
            raise EngineError(f"SamplingParams.structured: {messages[0]}", "structured")
        if len(self._valid) >= VALIDATED_GRAMMARS:
            self._valid.clear()
        self._valid.add(grammar)
        return grammar

    def constraints(self, structured: StructuredOutput, count: int) -> list[Constraint]:
        """`count` matchers of one grammar, compiled once (a request's n completions)."""
        first = LLMatcher(self.tokenizer, self.check(structured), log_level=0)
        matchers = [first] + [first.deep_copy() for _ in range(count - 1)]
        return [Constraint(m, structured.after, structured.after_within) for m in matchers]

    def allowed(self, rows: list[tuple[LLMatcher, int]], batch: int, device: torch.device) -> Tensor:
        """[batch, vocab] bool: the tokens each listed matcher allows next, in its row; other rows allow all.
        Only the listed rows' masks are computed, unpacked and sent to the device."""
        start = time.perf_counter()
        allowed = torch.ones(batch, self.vocab_size, dtype=torch.bool, device=device)
        if rows:
            if self._executor is None:
                self._executor = LLExecutor()
            bitmask = allocate_token_bitmask(len(rows), self.tokenizer.vocab_size)
            fill_next_token_bitmask_par(self._executor, [(m, i) for i, (m, _) in enumerate(rows)], bitmask)
            bits = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
            allowed[[row for _, row in rows]] = bits.view(len(rows), -1)[:, : self.vocab_size].bool().to(device)
        self.mask_seconds += time.perf_counter() - start
        return allowed
