"""POST /v1/completions (OpenAI's legacy API): one prompt or several (text or token ids, with an optional
fill-in-the-middle suffix), n completions each, whole or as a stream of SSE chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine import CompletionOutput, RequestOutput
from .bridge import Finished, next_event
from .bridge import Request as EngineRequest
from .protocol import APIError, CompletionRequest
from .server import Server
from .streaming import KEEP_ALIVE, collect, sse, stream_response

DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default


async def completion(server: Server, body: CompletionRequest, http: Request) -> dict[str, Any] | StreamingResponse:
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, f"best_of = {body.best_of}: only best_of = n is supported", "best_of")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens = 0: only with echo (to score the prompt)", "max_tokens")
    prompts = await asyncio.to_thread(_prompts, server, body)  # a long prompt: off the event loop
    max_tokens = body.max_tokens if body.max_tokens is not None else \
        server.llm.sampling_defaults.get("max_tokens", DEFAULT_MAX_TOKENS)
    # max_tokens 0 (echo only): the engine makes one token, which the response leaves out
    scored = body.logprobs if body.echo else None  # echo with logprobs: the prompt tokens' log-probabilities
    params = [server.sampling(body, p, max(max_tokens, 1), body.logprobs, prompt_logprobs=scored) for p in prompts]
    echo_scored = body.echo and body.logprobs is not None
    if body.n * len(prompts) > server.llm.max_num_seqs + server.config.max_queue:
        raise APIError(400, f"prompt: {len(prompts)} prompts x n = {body.n} exceed the server's capacity", "prompt")
    requests = _submit_all(server, prompts, params)
    echoes = [server.tokenizer.decode(p) if body.echo else "" for p in prompts]
    meta = server.response_meta("cmpl")
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_response(_completion_stream(server, requests, meta, prompts, echoes, body, usage))
    finished = await collect(server.engine, requests, http)
    choices, outputs, cached = [], [], 0
    for p, (event, echo) in enumerate(zip(finished, echoes, strict=True)):
        cached += event.output.num_cached_tokens
        for completion in event.output.outputs:
            if max_tokens == 0:
                completion = _without_output(completion)
            outputs.append(completion)
            logprobs = None
            if body.logprobs is not None:
                logprobs = _logprobs(server, completion.token_ids, completion.logprobs or [], body.logprobs, echo,
                                     event.output if echo_scored else None)
            choices.append({"index": p * body.n + completion.index, "text": echo + completion.text,
                            "logprobs": logprobs, "finish_reason": completion.finish_reason})
    return {**meta, "object": "text_completion", "choices": choices,
            "usage": server.usage(sum(len(p) for p in prompts), outputs, cached, 0)}


def _without_output(completion: CompletionOutput) -> CompletionOutput:
    """A completion of max_tokens 0: its one generated token dropped, ended by the length limit."""
    return replace(completion, text="", token_ids=[], logprobs=[], finish_reason="length", stop_reason=None)


def _logprobs(server: Server, token_ids: list[int], logprobs: list[dict[int, float]], top: int, echo: str,
              output: RequestOutput | None) -> dict[str, list]:
    """The legacy logprobs of generated tokens; after an echoed prompt (`output` given), its tokens' entries
    first (the first token's null), as OpenAI's legacy API and vLLM give them (what lm-eval's log-likelihoods
    read)."""
    if output is None:
        return server.completion_logprobs(token_ids, logprobs, top, 0)
    prompt = server.completion_logprobs(output.prompt_token_ids, output.prompt_logprobs, top, 0)
    generated = server.completion_logprobs(token_ids, logprobs, top, len(echo))
    return {key: prompt[key] + generated[key] for key in prompt}


def _submit_all(server: Server, prompts: list[list[int]], params: list) -> list[EngineRequest]:
    """Every prompt's engine request, or none: a refusal (a full queue's 429) releases those already taken."""
    requests: list[EngineRequest] = []
    try:
        for prompt, sampling in zip(prompts, params, strict=True):
            requests.append(server.engine.submit(prompt, sampling))
    except BaseException:
        for request in requests:
            server.engine.release(request)
        raise
    return requests


def _prompts(server: Server, body: CompletionRequest) -> list[list[int]]:
    """Token ids of every prompt in the request, each checked."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if body.suffix is not None:
        if any(not isinstance(p, str) for p in prompts):
            raise APIError(400, "suffix: needs a text prompt", "suffix")
        filled = [server.tokenizer.fim_prompt(p, body.suffix) for p in prompts]
        if filled[0] is None:
            raise APIError(400, "suffix: this model's tokenizer has no fill-in-the-middle tokens", "suffix")
        prompts = filled
    ids = [server.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    for i, prompt_ids in enumerate(ids):
        server.check_prompt(prompt_ids, "prompt" if len(ids) == 1 else f"prompt[{i}]")
    return ids


async def _completion_stream(server: Server, requests: list[EngineRequest], meta: dict[str, Any],
                             prompts: list[list[int]], echoes: list[str], body: CompletionRequest,
                             include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks: each choice's echoed prompt (when asked; with logprobs, once its prompt has run, with the
    prompt's), then text deltas in the order any prompt's completions produce them, an optional usage chunk,
    then [DONE]. Choice p * n + j is prompt p's j-th."""
    base, n, top = {**meta, "object": "text_completion"}, body.n, body.logprobs
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, logprobs: dict | None = None, finish: str | None = None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return sse({**base, "choices": [choice], **extra})

    events: asyncio.Queue = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(p, request, events)) for p, request in enumerate(requests)]
    offsets = {p * n + j: len(echo) for p, echo in enumerate(echoes) for j in range(n)}  # text so far, per choice
    try:
        for index, offset in offsets.items():
            if offset and top is None:
                yield chunk(index, echoes[index // n])
        outputs, cached, remaining = [], 0, len(requests)
        while remaining:
            try:
                p, event = await asyncio.wait_for(events.get(), server.config.sse_ping_interval)
            except TimeoutError:  # queued or in a long prefill: a comment keeps proxies and read timeouts waiting
                yield KEEP_ALIVE
                continue
            if isinstance(event, APIError):  # the engine failed: end the stream with the error
                raise event
            if isinstance(event, Finished):
                remaining -= 1
                outputs += [_without_output(c) if body.max_tokens == 0 else c for c in event.output.outputs]
                cached += event.output.num_cached_tokens
                continue
            index = p * n + event.index
            if event.prompt_logprobs is not None and body.echo:
                yield chunk(index, echoes[p], server.completion_logprobs(prompts[p], event.prompt_logprobs, top, 0))
            if body.max_tokens == 0:  # echo only: the engine's one token stays out
                event = replace(event, text="", token_ids=[], logprobs=[], finish_reason=event.finish_reason and
                                "length")
            logprobs = None
            if top is not None and event.token_ids:
                logprobs = server.completion_logprobs(event.token_ids, event.logprobs or [], top, offsets[index])
            offsets[index] += len(event.text)
            if event.text or event.token_ids or event.finish_reason:
                yield chunk(index, event.text, logprobs, event.finish_reason)
        if include_usage:
            yield sse({**base, "choices": [], "usage": server.usage(sum(len(p) for p in prompts), outputs, cached, 0)})
        yield sse("[DONE]")
    except APIError as exc:  # after the first byte an error can only travel in the stream
        yield sse(exc.body())
    finally:
        for task in pumps:
            task.cancel()
        for request in requests:
            server.engine.release(request)


async def _pump(p: int, request: EngineRequest, events: asyncio.Queue) -> None:
    """Move prompt p's events into the queue all prompts share, tagged with p (an engine failure too, which
    would otherwise die with this task and leave the stream waiting)."""
    while True:
        try:
            event = await next_event(request)
        except APIError as exc:
            await events.put((p, exc))
            return
        await events.put((p, event))
        if isinstance(event, Finished):
            return
