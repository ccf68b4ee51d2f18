"""SamplingParams, with vLLM's names and meanings; bad values raise an EngineError naming the parameter."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import EngineError
from .structured import StructuredOutput

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to the context limit
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI's penalties, over the generated tokens
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # CTRL/transformers' penalty, over prompt and generated tokens
    stop: list[str] | str | None = None  # strings that end the text; never part of it
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None  # the same seed gives the same output whatever else runs in the batch
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (vLLM's field)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling (OpenAI's)
    structured: StructuredOutput | None = None  # a grammar the text must match (vLLM's structured outputs)
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> SamplingParams:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise EngineError(f"SamplingParams.{name} = {getattr(self, name)!r}: {rule}", name)

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        need(is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1")
        need(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
             "must be an integer >= 1 (or None for up to the context limit)")
        need(isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100, "temperature",
             "must be between 0 (greedy) and 100")
        need(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(is_int(self.top_k) and self.top_k >= -1, "top_k", "must be -1 or 0 (off) or a positive integer")
        need(isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and -2 <= value <= 2, name, "must be in [-2, 2]")
        need(isinstance(self.repetition_penalty, (int, float)) and 0 < self.repetition_penalty <= 10,
             "repetition_penalty", "must be in (0, 10]")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        need(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "must be non-negative integers")
        need(self.seed is None or (is_int(self.seed) and -(2**63) <= self.seed < 2**63), "seed",
             "must be a 64-bit integer or None")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            need(value is None or (is_int(value) and 0 <= value <= MAX_LOGPROBS), name,
                 f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        need(self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
            is_int(t) and t >= 0 and isinstance(b, (int, float)) and -100 <= b <= 100
            for t, b in self.logit_bias.items())), "logit_bias",
            "must map token ids (integers >= 0) to biases in [-100, 100]")
        need(self.structured is None or isinstance(self.structured, StructuredOutput), "structured",
             "must be a StructuredOutput or None")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
