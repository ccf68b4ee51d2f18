"""A sequence being generated, and the outputs users see (vLLM's RequestOutput / CompletionOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .params import SamplingParams
from .structured import Constraint


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) or "length"
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob}, sampled token first
    cumulative_logprob: float | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it, if any
    # `LLM.chat` only: `text` split into the think block's reasoning (None without one) and the answer
    reasoning_content: str | None = None
    content: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: dict[str, float] = field(default_factory=dict)  # speculative drafts and acceptances
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    # SamplingParams.prompt_logprobs: per prompt token, None for the first, then {token id: logprob} with the
    # prompt's own token first and the most likely ones after it (vLLM's RequestOutput.prompt_logprobs)
    prompt_logprobs: list[dict[int, float] | None] | None = None


class Sequence:
    """One completion: its tokens, text, stop state, and the cache slot it decodes in."""

    def __init__(self, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams, seed: int,
                 eos_ids: set[int], tokenizer: Tokenizer | None, max_model_len: int):
        self.request_id, self.index, self.params, self.seed = request_id, index, params, seed
        self.prompt_ids = prompt_ids
        self.output_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.slot = -1
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        self.limit = min(max_model_len - len(prompt_ids), params.max_tokens or max_model_len)
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens) \
            if tokenizer else None
        self.text = ""
        self.streamed_chars = 0  # text already handed to a stream
        self.streamed_tokens = 0
        self.reported = False  # a server has sent this completion's finish
        self.drafted = self.accepted = 0
        self.cached_tokens = 0  # prompt tokens whose latents came from the prefix cache
        self.prompt_logprobs: list[dict[int, float] | None] | None = None  # set by the prefill that runs it
        self.constraint: Constraint | None = None  # SamplingParams.structured's matcher, set by the engine

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def next_position(self) -> int:
        """Position of the newest token, the next input of the model (it is not in the cache yet)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def append(self, token: int, logprobs: dict[int, float] | None) -> None:
        """Add a token and apply the stop rules: stop tokens, stop strings, the length limit."""
        self.output_ids.append(token)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token]
        refused = self.constraint is not None and token not in self.stop_ids and not self.constraint.consume(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            self.stop_reason = token if token in self.params.stop_token_ids else None  # None: end of sequence
        elif self.detokenizer is not None:
            before = len(self.text)
            self.text += self.detokenizer.push(token)
            if self.params.stop and self._find_stop(before):
                return
        if not self.finished and refused:
            self.finish_reason, self.stop_reason = "stop", "grammar"  # refused by the grammar: end here
        if not self.finished and self.constraint is not None and self.constraint.complete:
            self.finish_reason = "stop"  # the grammar allows nothing more
        if not self.finished and len(self.output_ids) >= self.limit:
            self.finish_reason = "length"
        if self.finished and self.detokenizer is not None:
            self.text += self.detokenizer.flush()

    def _find_stop(self, before: int) -> bool:
        """Stop strings may span tokens: search the new text together with the stop's length before it."""
        longest = max(len(s) for s in self.params.stop)
        start = max(0, before - longest + 1)
        hits = [(self.text.find(s, start), s) for s in self.params.stop]
        hits = [(at, s) for at, s in hits if at >= 0]
        if not hits:
            return False
        at, stop = min(hits)
        self.text = self.text[:at]  # the stop string is never part of the output
        self.finish_reason, self.stop_reason = "stop", stop
        return True

    def stream_delta(self) -> tuple[str, list[int]]:
        """Text and tokens not yet streamed. Text that could still turn into a stop string is held back."""
        hold = 0 if self.finished or not self.params.stop else max(len(s) for s in self.params.stop) - 1
        end = max(self.streamed_chars, len(self.text) - hold)
        text, self.streamed_chars = self.text[self.streamed_chars:end], end
        tokens, self.streamed_tokens = self.output_ids[self.streamed_tokens:], len(self.output_ids)
        return text, tokens

    def output(self) -> CompletionOutput:
        return CompletionOutput(self.index, self.text, list(self.output_ids), self.finish_reason, self.logprobs,
                                self.cumulative_logprob if self.logprobs is not None else None, self.stop_reason)
