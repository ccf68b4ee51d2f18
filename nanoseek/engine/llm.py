"""LLM: the engine's front, in the style of vLLM's `LLM` (generate) with a streaming form for servers."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_model, load_tokenizer
from ..config import PRESETS, preset
from ..model import CausalLM, LanguageModel
from ..model.layout import right_multiplied
from ..r1 import conversation_prompt, split_reply
from ..tokenizer import Tokenizer
from .errors import CONTEXT_LENGTH_EXCEEDED, EngineError
from .params import SamplingParams
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence
from .structured import Grammars

Prompt = str | list[int]
Conversation = list[dict[str, Any]]
# generation_config.json's keys that set sampling defaults -> SamplingParams fields (the keys vLLM reads)
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


@dataclass
class StreamDelta:
    """New output of one completion since the last delta; `finish_reason` is set on its last delta."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


class LLM:
    """Generate from a checkpoint directory (or a preset name, with random weights).

    Sequences run in a continuously batched decode loop over preallocated latent-cache slots: `max_num_seqs`
    slots of `max_model_len` positions. `speculative=True` drafts with the checkpoint's MTP module.
    `prefix_cache_tokens` > 0 keeps that many tokens of prompt latents for reuse by later prompts with the same
    start (not together with speculation, whose MTP draft needs every prompt position's hidden state).
    `quantize` ("int8" or "int4", CPU only) makes the matrices weight-only quantised after loading
    (`LanguageModel.quantize`; a model passed in is quantised in place); `dtype` is then the rest's.
    `compile=True` (CPU, float or int8 weights) compiles the decode steps (`LanguageModel.compile_decode`; a
    model passed in is compiled in place): faster decoding after a warm-up of tens of seconds the first time.
    `index_cache_dtype="int8"` keeps a DeepSeek-V3.2 model's indexer keys in int8 with one fp32 scale per key
    (decode steps on the CPU score them by int8 dot products), as V3.2 deploys them in FP8: about a quarter of
    an fp32 cache's bytes, half of a bf16 one's; the selection can differ from the float one's at near-ties.
    """

    def __init__(self, model: str | Path | LanguageModel, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None, max_num_seqs: int = 16, max_model_len: int | None = None,
                 speculative: bool = False, max_prefill_tokens: int = 4096, seed: int = 0,
                 tokenizer: Tokenizer | None = None, prefix_cache_tokens: int = 0, quantize: str | None = None,
                 compile: bool = False, index_cache_dtype: str | None = None):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if index_cache_dtype not in (None, "int8"):
            raise ValueError(f"index_cache_dtype = {index_cache_dtype!r}: must be None (the cache's dtype) or "
                             "'int8'")
        dtype = _resolve_dtype(dtype, device)
        if quantize is not None and device.type != "cpu":
            raise ValueError(f"quantize = {quantize!r}: the int8/int4 kernels are PyTorch's CPU ones and the device "
                             f"is {device}; pass device='cpu', or run bfloat16 on the GPU")
        if compile and (device.type != "cpu" or quantize not in (None, "int8")):
            raise ValueError(f"compile = True: the compiled decode steps are written for float or int8 weights on "
                             f"the CPU, and here the device is {device}, quantize = {quantize!r}")
        owned = not isinstance(model, torch.nn.Module)  # a model handed in keeps its layout
        if isinstance(model, LanguageModel):
            self.model = model.to(device=device, dtype=dtype).eval()
        elif isinstance(model, torch.nn.Module):
            raise TypeError(f"model: a {type(model).__name__} is not a nanoseek LanguageModel (CausalLM, DenseLM)")
        elif isinstance(model, str) and model in PRESETS and not Path(model).exists():
            torch.manual_seed(seed)
            with torch.device(device):
                self.model = CausalLM(preset(model)).to(dtype).eval()
        else:
            self.model = load_model(model, device=device, dtype=dtype, quantize=quantize)
            tokenizer = tokenizer or load_tokenizer(model)  # tokenizer.json, or a GGUF file's metadata
        if quantize is not None:
            self.model.quantize(quantize)  # after load_model(quantize=...), nothing is left to do
        elif owned and device.type == "cpu" and not compile:
            right_multiplied(self.model)  # the faster layout for eager CPU decode (model/layout.py)
        if compile:
            self.model.compile_decode()
        self.tokenizer = tokenizer
        config = self.model.config
        if index_cache_dtype and not config.index_cache_dim:
            raise ValueError(f"index_cache_dtype = {index_cache_dtype!r}: this {type(config).__name__} model has no "
                             "sparse-attention indexer (a deepseek_v32 checkpoint's DeepSeekV32Config has)")
        if speculative and not len(self.model.mtp):
            raise ValueError("speculative=True needs a checkpoint with MTP weights (num_nextn_predict_layers >= 1)")
        self.max_model_len = min(max_model_len or 2048, config.max_position_embeddings)
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs = {max_num_seqs}: must be >= 1")
        if prefix_cache_tokens and speculative:
            raise ValueError("prefix_cache_tokens: the prefix cache does not combine with speculative=True yet")
        if prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens = {prefix_cache_tokens}: must be >= 0")
        self.max_num_seqs = max_num_seqs
        self.runner = ModelRunner(self.model, max_num_seqs, self.max_model_len, speculative, prefix_cache_tokens,
                                  torch.int8 if index_cache_dtype else None)
        self.scheduler = Scheduler(max_num_seqs, max_prefill_tokens)
        self.eos_ids = self._eos_ids()
        self.runner.grammars = self.grammars = Grammars(tokenizer, config.vocab_size, self.eos_ids)
        self.sampling_defaults = self._sampling_defaults()
        self._rng = random.Random(seed)
        self._ids = itertools.count()
        self.requests: dict[str, list[Sequence]] = {}
        self.prompts: dict[str, str | None] = {}

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.get("eos_token_id", self.model.config.eos_token_id)
        ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _sampling_defaults(self) -> dict[str, Any]:
        """The checkpoint's generation_config.json sampling settings as SamplingParams fields (checked)."""
        config = self.model.generation_config
        defaults = {field: config[key] for key, field in GENERATION_DEFAULTS.items() if config.get(key) is not None}
        try:
            SamplingParams(**defaults)
        except (EngineError, TypeError) as exc:
            raise ValueError(f"generation_config.json: {exc}") from exc
        return defaults

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json defaults (temperature, top_p, top_k, min_p,
        repetition_penalty, max_new_tokens), what `generate` and `chat` use when given none."""
        return SamplingParams(**self.sampling_defaults)

    # ---- requests ------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt, checked: non-empty, in the vocabulary, leaving room for a new token."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EngineError("prompt: a text prompt needs a tokenizer and this model has none; pass token ids",
                                  "prompt")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, Seq) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise EngineError("prompt: must be a string or a list of token ids", "prompt")
        if not ids:
            raise EngineError("prompt: is empty", "prompt")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise EngineError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        if len(ids) >= self.max_model_len:
            raise EngineError(f"prompt: {len(ids)} tokens do not fit max_model_len = {self.max_model_len} "
                              "with room for one new token", "prompt", CONTEXT_LENGTH_EXCEEDED)
        return ids

    def check(self, prompt: Prompt, params: SamplingParams | None) -> tuple[list[int], SamplingParams]:
        """(prompt token ids, params) after every check a request must pass; raises EngineError otherwise."""
        params = (params or self.default_sampling_params()).validate()
        ids = self.encode(prompt)
        if params.n > self.max_num_seqs:
            raise EngineError(f"SamplingParams.n = {params.n}: must be <= max_num_seqs ({self.max_num_seqs})", "n")
        vocab = self.model.config.vocab_size
        outside = [t for t in params.logit_bias or {} if t >= vocab]
        if outside:
            raise EngineError(f"SamplingParams.logit_bias: token id {outside[0]} is outside the vocabulary "
                              f"[0, {vocab})", "logit_bias")
        if params.structured is not None:
            self.grammars.check(params.structured)
        if params.stop and self.tokenizer is None:
            raise EngineError("SamplingParams.stop: stop strings need a tokenizer and this model has none", "stop")
        return ids, params

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None) -> str:
        """Queue a request (checked first: a bad one leaves nothing behind); returns its id."""
        ids, params = self.check(prompt, params)
        request_id = str(next(self._ids))
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        group = [Sequence(request_id, i, ids, params, _child_seed(base_seed, i), self.eos_ids, self.tokenizer,
                          self.max_model_len) for i in range(params.n)]
        if params.structured is not None:  # a matcher of its own for each completion
            for seq, constraint in zip(group, self.grammars.constraints(params.structured, len(group)),
                                       strict=True):
                seq.constraint = constraint
        self.requests[request_id] = group
        self.prompts[request_id] = prompt if isinstance(prompt, str) else None
        self.scheduler.add(group)
        return request_id

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self.requests.pop(request_id, None)
        self.prompts.pop(request_id, None)

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Admit what fits and prefill it, decode the rest of the running batch; returns sequences that moved."""
        running = list(self.scheduler.running)
        admitted = self.scheduler.admit()
        if admitted:
            self.runner.prefill(admitted)
        if running:
            self.runner.decode(running)
        moved = admitted + running
        for seq in moved:
            if seq.finished:
                self.scheduler.release(seq)
        return moved

    def output(self, request_id: str) -> RequestOutput:
        group = self.requests[request_id]
        metrics = {"draft_tokens": sum(s.drafted for s in group), "accepted_tokens": sum(s.accepted for s in group)}
        return RequestOutput(request_id, self.prompts[request_id], group[0].prompt_ids, [s.output() for s in group],
                             all(s.finished for s in group), metrics, group[0].cached_tokens,
                             group[0].prompt_logprobs)

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] |
                 None = None) -> list[RequestOutput]:
        """Complete every prompt; one RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        for prompt, p in zip(prompts, params, strict=True):  # check everything before queueing anything
            self.check(prompt, p)
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(self.add_request(prompt, p))
            while any(not all(s.finished for s in self.requests[i]) for i in ids):
                self.step()
            return [self.output(i) for i in ids]
        finally:
            for request_id in ids:
                self.abort(request_id)

    def chat(self, messages: Conversation | list[Conversation],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             **template_kwargs: Any) -> list[RequestOutput]:
        """Reply to one conversation or several (lists of {"role", "content"} messages, as vLLM's `LLM.chat`)
        through the tokenizer's chat template, `template_kwargs` passed to it; each completion's text is also
        split into `reasoning_content` (a think block's, or None) and `content`, as the server splits it."""
        if self.tokenizer is None:
            raise EngineError("messages: chat needs a tokenizer and this model has none", "messages")
        if not self.tokenizer.chat_template:
            raise EngineError("messages: this model's tokenizer has no chat template; use generate", "messages")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [conversation_prompt(self.tokenizer, c, **template_kwargs) for c in conversations]
        results = self.generate([p.ids for p in prompts], sampling_params)
        for prompt, result in zip(prompts, results, strict=True):
            outputs = []
            for out in result.outputs:
                reasoning, content = split_reply(out.text, prompt.opened)
                outputs.append(replace(out, reasoning_content=reasoning, content=content))
            result.outputs = outputs
        return results

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield each completion's new text and tokens as they are produced (other requests keep running, and
        steps taken by other callers move this request too)."""
        request_id = self.add_request(prompt, params)
        group = self.requests[request_id]
        reported = set()
        try:
            while len(reported) < len(group):
                if not all(s.finished for s in group):
                    self.step()
                for seq in group:
                    if seq.index in reported:
                        continue
                    text, tokens = seq.stream_delta()
                    if seq.finished:
                        reported.add(seq.index)
                    if text or tokens or seq.finished:
                        yield StreamDelta(request_id, seq.index, text, tokens, seq.finish_reason)
        finally:
            self.abort(request_id)


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A torch dtype, or its name as vLLM takes it ("auto": bfloat16 on CUDA, float32 on CPU)."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype = {dtype!r}: one of auto, {', '.join(names)}")
    return names[dtype]


def _child_seed(seed: int, index: int) -> int:
    """Seeds of a request's n completions: the request seed for the first, distinct ones after."""
    return seed if index == 0 else (seed * 1_000_003 + index * 7_919) % (1 << 62)
