"""POST /v1/chat/completions: the chat-only checks, and each reply split into `reasoning_content` and
`content`, whole or as a stream of SSE chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine import CompletionOutput, RequestOutput
from ..engine.structured import StructuredOutput
from ..r1 import CONTENT, THINK_CLOSE, ReasoningParser, split_reply
from .bridge import Finished, next_event
from .bridge import Request as EngineRequest
from .protocol import APIError, ChatRequest
from .server import Server
from .streaming import KEEP_ALIVE, collect, sse, stream_response


async def chat_completion(server: Server, body: ChatRequest, http: Request) -> dict[str, Any] | StreamingResponse:
    _refuse_unsupported(server, body)
    ids, in_reasoning = await asyncio.to_thread(server.chat_prompt, body)  # a long prompt: off the event loop
    await asyncio.to_thread(server.check_prompt, ids, "messages")
    caps = [c for c in (body.max_tokens, body.max_completion_tokens) if c is not None]
    top = (body.top_logprobs or 0) if body.logprobs else None  # alternatives per token; None: no logprobs
    structured = _structured(server, body, in_reasoning)
    params = server.sampling(body, ids, min(caps) if caps else None, top, reasoner_rules=in_reasoning,
                             structured=structured)
    request = server.engine.submit(ids, params)
    meta = server.response_meta("chatcmpl")
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_response(_chat_stream(server, request, meta, ids, in_reasoning, body.n, usage, top))
    (finished,) = await collect(server.engine, [request], http)
    output = finished.output
    return {**meta, "object": "chat.completion",
            "choices": [_choice(server, completion, in_reasoning, top) for completion in output.outputs],
            "usage": _usage(server, len(ids), output, in_reasoning)}


def _refuse_unsupported(server: Server, body: ChatRequest) -> None:
    """Chat fields this server does not implement are refused, never silently ignored."""
    if body.tools and body.tool_choice != "none":
        raise APIError(400, "tools: this server has no tool calling (send tool_choice 'none' or no tools)", "tools")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs = true", "top_logprobs")
    if server.config.compat == "deepseek-r1" and (body.logprobs or body.top_logprobs is not None):
        raise APIError(400, "logprobs: not supported by the reasoner (DeepSeek-R1's rule)", "logprobs")


def _structured(server: Server, body: ChatRequest, in_reasoning: bool) -> StructuredOutput | None:
    """response_format as a grammar: `json_object` any JSON object, `json_schema` its schema (with `strict`,
    the schema checked against the rules of OpenAI's and DeepSeek's strict mode first). After an R1 prompt the
    grammar starts once the think block closes: the reasoning stays free text."""
    form = body.response_format
    if form is None or form.type == "text":
        return None
    schema: dict[str, Any] = {"type": "object"}
    if form.type == "json_schema":
        if form.json_schema is None or form.json_schema.schema_ is None:
            raise APIError(400, "response_format.json_schema.schema: required for type 'json_schema'",
                           "response_format.json_schema.schema")
        schema = form.json_schema.schema_
        problem = strict_violation(schema) if form.json_schema.strict else None
        if problem:
            raise APIError(400, f"response_format.json_schema.schema{problem}", "response_format.json_schema.schema")
    if in_reasoning and server.think_close_id is None:
        raise APIError(400, "response_format: the prompt opens a think block and the tokenizer has no single "
                       f"{THINK_CLOSE} token to start the JSON after; send thinking: {{'type': 'disabled'}}",
                       "response_format")
    return StructuredOutput(json=schema, after=server.think_close_id if in_reasoning else None)


def strict_violation(schema: Any, path: str = "") -> str | None:
    """Where `schema` breaks strict mode, as '.properties.x: why'; None if it keeps it. Strict: every object
    lists all its properties as required and sets additionalProperties false (OpenAI's structured outputs;
    DeepSeek's strict function calling)."""
    if isinstance(schema, list):
        return next((p for i, item in enumerate(schema) if (p := strict_violation(item, f"{path}.{i}"))), None)
    if not isinstance(schema, dict):
        return None
    if schema.get("type") == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is not False:
            return f"{path}: strict mode needs additionalProperties: false on every object"
        missing = sorted(set(properties) - set(schema.get("required", [])))
        if missing:
            return f"{path}: strict mode needs every property required; not required: {', '.join(missing)}"
    for key in ("properties", "$defs", "definitions"):
        for name, sub in schema.get(key, {}).items():
            if (problem := strict_violation(sub, f"{path}.{key}.{name}")):
                return problem
    for key in ("items", "anyOf", "allOf", "oneOf"):
        if key in schema and (problem := strict_violation(schema[key], f"{path}.{key}")):
            return problem
    return None


def _choice(server: Server, completion: CompletionOutput, in_reasoning: bool, top: int | None) -> dict[str, Any]:
    logprobs = None
    if top is not None:
        logprobs = {"content": server.chat_logprobs(completion.token_ids, completion.logprobs or [], top)}
    return {"index": completion.index, "message": _message(completion, in_reasoning), "logprobs": logprobs,
            "finish_reason": completion.finish_reason}


def _message(completion: CompletionOutput, in_reasoning: bool) -> dict[str, str]:
    reasoning, content = split_reply(completion.text, in_reasoning)
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def _usage(server: Server, prompt_len: int, output: RequestOutput, in_reasoning: bool) -> dict[str, Any]:
    reasoning = sum(server.reasoning_tokens(c.token_ids, in_reasoning) for c in output.outputs)
    return server.usage(prompt_len, output.outputs, output.num_cached_tokens, reasoning)


async def _chat_stream(server: Server, request: EngineRequest, meta: dict[str, Any], ids: list[int],
                       in_reasoning: bool, n: int, include_usage: bool, top: int | None) -> AsyncIterator[str]:
    """SSE chunks: the role first, then reasoning_content deltas, then content deltas, one finish_reason per
    choice, an optional usage chunk, then [DONE] (OpenAI's streaming format)."""
    base = {**meta, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: list | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None,
                  "finish_reason": finish}
        return sse({**base, "choices": [choice], **extra})

    parsers = [ReasoningParser(in_reasoning) for _ in range(n)]
    try:
        for index in range(n):
            yield chunk(index, {"role": "assistant", "content": ""})
        while not isinstance(event := await next_event(request, server.config.sse_ping_interval), Finished):
            if event is None:  # queued or in a long prefill: a comment keeps proxies and read timeouts waiting
                yield KEEP_ALIVE
                continue
            parser = parsers[event.index]
            pieces = parser.feed(event.text) + (parser.finish() if event.finish_reason else [])
            logprobs = server.chat_logprobs(event.token_ids, event.logprobs or [], top) if top is not None else None
            for kind, text in pieces:
                yield chunk(event.index, {"content": text} if kind == CONTENT else {"reasoning_content": text},
                            logprobs=logprobs)
                logprobs = None  # a delta's logprobs ride on its first chunk
            if logprobs:
                yield chunk(event.index, {}, logprobs=logprobs)
            if event.finish_reason:
                yield chunk(event.index, {}, event.finish_reason)
        if include_usage:
            yield sse({**base, "choices": [], "usage": _usage(server, len(ids), event.output, in_reasoning)})
        yield sse("[DONE]")
    except APIError as exc:  # after the first byte an error can only travel in the stream
        yield sse(exc.body())
    finally:
        server.engine.release(request)
