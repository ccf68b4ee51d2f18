"""The one sampler: logits -> tokens for a batch whose rows each have their own SamplingParams.

Order of processing (vLLM's): logit bias -> penalties -> temperature -> top-k -> top-p -> min-p, then sampling by
inversion: the first token whose cumulative probability exceeds a uniform u. Its randomness is a counter-based hash of
(seed, output index, stream), computed in tensor ops: a row's draws depend only on its own seed and position,
never on what else is in the batch, and no per-row generator is needed. One uniform per row, not one per token
as an exponential race would take: hashing [B, V] int64s cost a quarter of a 64-row GRPO rollout step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .params import SamplingParams

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic); multiplication wraps.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)

# Random streams, so that the draws for different purposes at one output index are independent.
SAMPLE, DRAFT, ACCEPT, RESIDUAL = 0, 1, 2, 3


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: Tensor) -> Tensor:
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


# Bits of a uniform: with 51, (bits + 0.5) / 2^51 is exact in float64 and at most 1 - 2^-52, so u times a
# positive total rounds below the total (`draw` never runs past the last token).
_UNIFORM_BITS = 51


def uniform(seeds: Tensor, steps: Tensor, stream: int) -> Tensor:
    """[B] float64s in (0, 1), a pure function of (seed, step, stream)."""
    bits = _shift_right(_mix(_mix(_mix(seeds * _GOLDEN + stream) + steps)), 64 - _UNIFORM_BITS)
    return (bits.double() + 0.5) / float(1 << _UNIFORM_BITS)


@dataclass
class SamplingBatch:
    """The per-row parameters of one step, as tensors."""

    params: list[SamplingParams]
    seeds: Tensor  # [B] int64
    steps: Tensor  # [B] int64: output index of the token being sampled
    temperature: Tensor
    greedy: Tensor  # [B] bool
    top_k: Tensor  # [B] int64, vocab size when off
    top_p: Tensor
    min_p: Tensor
    presence: Tensor
    frequency: Tensor
    repetition: Tensor
    bias: tuple[Tensor, Tensor, Tensor] | None = None  # (rows, token ids, biases) of every row's logit_bias

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], steps: list[int], vocab: int,
              device: torch.device) -> SamplingBatch:
        def column(values, dtype=torch.float32) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            params=params,
            seeds=column(seeds, torch.int64), steps=column(steps, torch.int64),
            temperature=column([p.temperature or 1.0 for p in params])[:, None],
            greedy=column([p.greedy for p in params], torch.bool),
            top_k=column([p.top_k if p.top_k > 0 else vocab for p in params], torch.int64),
            top_p=column([p.top_p for p in params])[:, None],
            min_p=column([p.min_p for p in params])[:, None],
            presence=column([p.presence_penalty for p in params])[:, None],
            frequency=column([p.frequency_penalty for p in params])[:, None],
            repetition=column([p.repetition_penalty for p in params])[:, None],
            bias=_bias(params, device),
        )

    def at(self, offset: int | Tensor) -> SamplingBatch:
        """The same rows sampling `offset` output indices later."""
        return SamplingBatch(**{**self.__dict__, "steps": self.steps + offset})

    @property
    def any_penalty(self) -> bool:
        return any(p.penalised for p in self.params)

    @property
    def all_greedy(self) -> bool:
        return all(p.greedy for p in self.params)

    @property
    def any_greedy(self) -> bool:
        return any(p.greedy for p in self.params)


def _bias(params: list[SamplingParams], device: torch.device) -> tuple[Tensor, Tensor, Tensor] | None:
    entries = [(row, token, bias) for row, p in enumerate(params) for token, bias in (p.logit_bias or {}).items()]
    if not entries:
        return None
    rows, tokens, biases = zip(*entries, strict=True)
    return (torch.tensor(rows, device=device), torch.tensor(tokens, device=device),
            torch.tensor(biases, dtype=torch.float32, device=device))


def process(logits: Tensor, batch: SamplingBatch, counts: Tensor | None = None,
            seen: Tensor | None = None) -> Tensor:
    """Biased, penalised, tempered and truncated logits [B, V] (fp32); greedy rows keep their biased and
    penalised logits, so that a bias of -100 bans a token from greedy decoding too.

    counts [B, V]: how often each token was generated so far; seen [B, V]: tokens in prompt or output.
    """
    logits = logits.float()
    if batch.bias is not None:
        logits = logits.index_put(batch.bias[:2], batch.bias[2], accumulate=True)  # a copy: raw logits stay
    if counts is not None and batch.any_penalty:
        penalised = torch.where(logits > 0, logits / batch.repetition, logits * batch.repetition)
        logits = torch.where(seen, penalised, logits)
        logits = logits - batch.frequency * counts - batch.presence * (counts > 0)
    if batch.all_greedy:
        return logits
    scaled = torch.where(batch.greedy[:, None], logits, logits / batch.temperature)
    needs_truncation = any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in batch.params if not p.greedy)
    if not needs_truncation:
        return scaled
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(scaled.shape[-1], device=scaled.device)
    drop = ranks[None] >= batch.top_k[:, None]
    # top-p and min-p act on the distribution left after top-k, renormalised (as in vLLM)
    sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # top-p keeps the smallest prefix whose mass reaches top_p (always at least the top token)
    drop |= ((sorted_probs.cumsum(dim=-1) - sorted_probs) >= batch.top_p) & (batch.top_p < 1)
    drop |= sorted_probs < batch.min_p * sorted_probs[:, :1]
    drop &= ~batch.greedy[:, None]
    return scaled.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample(processed: Tensor, batch: SamplingBatch, stream: int = SAMPLE) -> Tensor:
    """Tokens [B]: argmax for greedy rows, a draw under the row's own noise otherwise."""
    if batch.all_greedy:
        return processed.argmax(dim=-1)
    drawn = draw(processed.softmax(dim=-1), batch, stream)
    return torch.where(batch.greedy, processed.argmax(dim=-1), drawn) if batch.any_greedy else drawn


def verify(target: Tensor, draft_probs: Tensor | None, draft: Tensor, batch: SamplingBatch) -> tuple[Tensor, Tensor]:
    """Speculative verification of one drafted token per row: (token, accepted).

    `target` are the main model's processed logits at the drafted position, `draft_probs` the distribution the
    draft was drawn from. Greedy rows accept iff the draft is the argmax. Sampled rows accept with probability
    min(1, p(d) / q(d)) and otherwise draw from the normalised (p - q)+, which leaves every emitted token
    distributed exactly as p (Leviathan et al. 2023, Chen et al. 2023).
    """
    first = sample(target, batch)
    accepted = first == draft
    if batch.all_greedy:
        return first, accepted
    p, q = target.softmax(dim=-1), draft_probs
    ratio = p.gather(1, draft[:, None])[:, 0] / q.gather(1, draft[:, None])[:, 0].clamp_min(1e-30)
    sampled_accept = uniform(batch.seeds, batch.steps, ACCEPT) < ratio
    residual = (p - q).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    resampled = draw(residual, batch, RESIDUAL)
    accepted = torch.where(batch.greedy, accepted, sampled_accept)
    return torch.where(batch.greedy, first, torch.where(accepted, draft, resampled)), accepted


def draw(probs: Tensor, batch: SamplingBatch, stream: int) -> Tensor:
    """A draw from each row of probs [B, V] (unnormalised is fine), by inversion: the first token whose
    cumulative mass exceeds u times the row's total. In float64, so that a token's chance is its probability
    to within 2^-51 (with a float32 u, each token's would be off by up to 2^-24: over DeepSeek's 129k tokens,
    0.4% of the mass in total variation); a token of probability 0 is never drawn (its cumulative mass equals
    its predecessor's in the CPU's in-order sum). A row with NaNs (a diverged model) gets the last token, an id
    in range, as argmax gave it."""
    cumulative = probs.double().cumsum(dim=-1)
    target = uniform(batch.seeds, batch.steps, stream) * cumulative[:, -1]
    return torch.searchsorted(cumulative, target[:, None], right=True)[:, 0].clamp_max(probs.shape[-1] - 1)


def token_logprobs(logits: Tensor, tokens: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """From the model's raw logits [B, V]: (logprob of tokens [B], top-`top` logprobs and ids [B, top])."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    values, ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], tokens[:, None][:, :0])
    return chosen, values, ids
