"""POST /v1/completions (OpenAI's legacy API): one prompt or several (text or token ids, with an optional
fill-in-the-middle suffix), n completions each, whole or as a stream of SSE chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from .bridge import Finished, next_event
from .bridge import Request as EngineRequest
from .protocol import APIError, CompletionRequest
from .server import Server
from .streaming import KEEP_ALIVE, collect, sse, stream_response

DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default


async def completion(server: Server, body: CompletionRequest, http: Request) -> dict[str, Any] | StreamingResponse:
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, f"best_of = {body.best_of}: only best_of = n is supported", "best_of")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo: prompt log-probabilities are not supported; drop echo or logprobs", "echo")
    prompts = await asyncio.to_thread(_prompts, server, body)  # a long prompt: off the event loop
    max_tokens = body.max_tokens if body.max_tokens is not None else \
        server.llm.sampling_defaults.get("max_tokens", DEFAULT_MAX_TOKENS)
    params = [server.sampling(body, p, max_tokens, body.logprobs) for p in prompts]
    if body.n * len(prompts) > server.llm.max_num_seqs + server.config.max_queue:
        raise APIError(400, f"prompt: {len(prompts)} prompts x n = {body.n} exceed the server's capacity", "prompt")
    requests = _submit_all(server, prompts, params)
    echoes = [server.tokenizer.decode(p) if body.echo else "" for p in prompts]
    meta = server.response_meta("cmpl")
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_response(_completion_stream(server, requests, meta, prompts, echoes, body.n, usage,
                                                  body.logprobs))
    finished = await collect(server.engine, requests, http)
    choices, outputs, cached = [], [], 0
    for p, (event, echo) in enumerate(zip(finished, echoes, strict=True)):
        cached += event.output.num_cached_tokens
        for completion in event.output.outputs:
            outputs.append(completion)
            logprobs = None
            if body.logprobs is not None:
                logprobs = server.completion_logprobs(completion.token_ids, completion.logprobs or [], body.logprobs,
                                                      len(echo))
            choices.append({"index": p * body.n + completion.index, "text": echo + completion.text,
                            "logprobs": logprobs, "finish_reason": completion.finish_reason})
    return {**meta, "object": "text_completion", "choices": choices,
            "usage": server.usage(sum(len(p) for p in prompts), outputs, cached, 0)}


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
        if server.tokenizer.token_id(FIM_PREFIX) is None:
            raise APIError(400, "suffix: this model's tokenizer has no fill-in-the-middle tokens", "suffix")
        prompts = [f"{FIM_PREFIX}{p}{FIM_SUFFIX}{body.suffix}{FIM_MIDDLE}" for p in prompts]
    ids = [server.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    for i, prompt_ids in enumerate(ids):
        server.check_prompt(prompt_ids, "prompt" if len(ids) == 1 else f"prompt[{i}]")
    return ids


async def _completion_stream(server: Server, requests: list[EngineRequest], meta: dict[str, Any],
                             prompts: list[list[int]], echoes: list[str], n: int, include_usage: bool,
                             top: int | None) -> AsyncIterator[str]:
    """SSE chunks: each choice's echoed prompt (when asked), then text deltas in the order any prompt's
    completions produce them, an optional usage chunk, then [DONE]. Choice p * n + j is prompt p's j-th."""
    base = {**meta, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, logprobs: dict | None = None, finish: str | None = None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return sse({**base, "choices": [choice], **extra})

    events: asyncio.Queue = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(p, request, events)) for p, request in enumerate(requests)]
    offsets = {p * n + j: len(echo) for p, echo in enumerate(echoes) for j in range(n)}  # text so far, per choice
    try:
        for index, offset in offsets.items():
            if offset:
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
                outputs += event.output.outputs
                cached += event.output.num_cached_tokens
                continue
            index = p * n + event.index
            logprobs = None
            if top is not None:
                logprobs = server.completion_logprobs(event.token_ids, event.logprobs or [], top, offsets[index])
            offsets[index] += len(event.text)
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
