"""POST /v1/chat/completions: the chat-only checks, and each reply split into `reasoning_content` and
`content`, whole or as a stream of SSE chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
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
from .tools import DEEPSEEK, CallSyntax, Function, ToolStream, calls_grammar, functions, openai_calls, strict_violation


async def chat_completion(server: Server, body: ChatRequest, http: Request) -> dict[str, Any] | StreamingResponse:
    _refuse_unsupported(server, body)
    offered = _offered_tools(body)
    ids, in_reasoning = await asyncio.to_thread(server.chat_prompt, body, True, offered)  # off the event loop
    await asyncio.to_thread(server.check_prompt, ids, "messages")
    caps = [c for c in (body.max_tokens, body.max_completion_tokens) if c is not None]
    top = (body.top_logprobs or 0) if body.logprobs else None  # alternatives per token; None: no logprobs
    # an R1 reply that must be JSON or a call thinks for at most half its tokens, then closes the block
    thinking = max(1, server.reply_limit(ids, min(caps) if caps else None) // 2) if in_reasoning else None
    plan = _tool_plan(server, body, offered, thinking)
    structured = plan.structured if plan is not None else _structured(server, body, thinking)
    params = await asyncio.to_thread(  # off the event loop too: it compiles the grammar
        server.sampling, body, ids, min(caps) if caps else None, top, reasoner_rules=in_reasoning,
        structured=structured, keep_special=plan is not None and plan.syntax is DEEPSEEK,
        structured_param="tools" if plan is not None else "response_format")
    request = server.engine.submit(ids, params)
    meta = server.response_meta("chatcmpl")
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_response(_chat_stream(server, request, meta, ids, in_reasoning, body.n, usage, top, plan))
    (finished,) = await collect(server.engine, [request], http)
    output = finished.output
    choices = [_choice(server, completion, in_reasoning, top, plan) for completion in output.outputs]
    server.engine.metrics.tool_calls.inc(sum(len(c["message"].get("tool_calls", [])) for c in choices))
    return {**meta, "object": "chat.completion", "choices": choices,
            "usage": _usage(server, len(ids), output, in_reasoning)}


@dataclass
class ToolPlan:
    """What a request's tools ask of its reply: read calls out of it in `syntax`, at most one unless
    `parallel`, and, for tool_choice required or a named function (or strict functions once the model opens a
    call), the grammar that makes every call valid."""

    syntax: CallSyntax
    parallel: bool
    structured: StructuredOutput | None


def _offered_tools(body: ChatRequest) -> list[Function]:
    """The functions the prompt lists: none for tool_choice 'none'."""
    available = functions(body.tools)
    if body.tool_choice is not None and body.tool_choice != "none" and not available:
        raise APIError(400, "tool_choice: needs tools", "tool_choice")
    return [] if body.tool_choice == "none" else available


def _tool_plan(server: Server, body: ChatRequest, offered: list[Function], thinking: int | None) -> ToolPlan | None:
    """`thinking`: None when the prompt leaves no think block open, else the most tokens it may take."""
    if not offered:
        return None
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "response_format: not together with tools (a reply is a call or JSON, not both)",
                       "response_format")
    choice, parallel, syntax = body.tool_choice or "auto", body.parallel_tool_calls is not False, server.call_syntax
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        forced = [f for f in offered if f.name == name]
        if choice.get("type") != "function" or not forced:
            raise APIError(400, f"tool_choice.function.name = {name!r}: not among the tools",
                           "tool_choice.function.name")
        parallel = False  # a named function: that one call
    elif choice == "required":
        forced = offered
    else:  # auto: text or calls; strict functions are held to their schemas once a call opens
        opener = server.tokenizer.token_id(syntax.block_open) if syntax.block_open else None
        if opener is None or not any(f.strict for f in offered):
            return ToolPlan(syntax, parallel, None)
        held = [f if f.strict else replace(f, parameters={"type": "object"}) for f in offered]  # only strict ones
        grammar = calls_grammar(syntax, held, parallel, server.tokenizer, opened=True)
        return ToolPlan(syntax, parallel, StructuredOutput(grammar=grammar, after=opener))
    grammar = calls_grammar(syntax, forced, parallel, server.tokenizer)
    return ToolPlan(syntax, parallel, StructuredOutput(grammar=grammar, **_after_thinking(server, thinking,
                                                                                         "tool_choice")))


def _after_thinking(server: Server, thinking: int | None, param: str) -> dict[str, int | None]:
    """StructuredOutput's `after` fields for a grammar that follows the think block (if one is open)."""
    if thinking is None:
        return {}
    if server.think_close_id is None:
        raise APIError(400, f"{param}: the prompt opens a think block and the tokenizer has no single "
                       f"{THINK_CLOSE} token to start after; send thinking: {{'type': 'disabled'}}", param)
    return {"after": server.think_close_id, "after_within": thinking}


def _refuse_unsupported(server: Server, body: ChatRequest) -> None:
    """Chat fields this server does not implement are refused, never silently ignored."""
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs = true", "top_logprobs")
    if server.config.compat == "deepseek-r1" and (body.logprobs or body.top_logprobs is not None):
        raise APIError(400, "logprobs: not supported by the reasoner (DeepSeek-R1's rule)", "logprobs")


def _structured(server: Server, body: ChatRequest, thinking: int | None) -> StructuredOutput | None:
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
    return StructuredOutput(json=schema, **_after_thinking(server, thinking, "response_format"))


def _choice(server: Server, completion: CompletionOutput, in_reasoning: bool, top: int | None,
            plan: ToolPlan | None) -> dict[str, Any]:
    logprobs = None
    if top is not None:
        logprobs = {"content": server.chat_logprobs(completion.token_ids, completion.logprobs or [], top)}
    message, finish = _message(completion, in_reasoning), completion.finish_reason
    parsed = None if plan is None or message["content"] is None else plan.syntax.parse(message["content"])
    if parsed is not None:
        before, calls = parsed
        message["content"] = before if before.strip() else None  # as a stream sends it
        message["tool_calls"] = openai_calls(calls if plan.parallel else calls[:1])
        finish = "tool_calls"
    return {"index": completion.index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def _message(completion: CompletionOutput, in_reasoning: bool) -> dict[str, Any]:
    reasoning, content = split_reply(completion.text, in_reasoning)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


class ReplyStream:
    """One choice's streamed text as chat deltas: reasoning_content, content and, with tools, tool_calls."""

    def __init__(self, in_reasoning: bool, plan: ToolPlan | None):
        self.reasoning = ReasoningParser(in_reasoning)
        self.calls = None if plan is None else ToolStream(plan.syntax, plan.parallel)

    def feed(self, text: str, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for kind, piece in self.reasoning.feed(text) + (self.reasoning.finish() if final else []):
            if kind != CONTENT:
                deltas.append({"reasoning_content": piece})
                continue
            plain, calls = (piece, []) if self.calls is None else self.calls.feed(piece)
            deltas += ([{"content": plain}] if plain else []) + ([{"tool_calls": calls}] if calls else [])
        if final and self.calls is not None and (rest := self.calls.finish()):
            deltas.append({"content": rest})
        return deltas

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls is not None and self.calls.sent else reason


def _usage(server: Server, prompt_len: int, output: RequestOutput, in_reasoning: bool) -> dict[str, Any]:
    reasoning = sum(server.reasoning_tokens(c.token_ids, in_reasoning) for c in output.outputs)
    return server.usage(prompt_len, output.outputs, output.num_cached_tokens, reasoning)


async def _chat_stream(server: Server, request: EngineRequest, meta: dict[str, Any], ids: list[int],
                       in_reasoning: bool, n: int, include_usage: bool, top: int | None,
                       plan: ToolPlan | None) -> AsyncIterator[str]:
    """SSE chunks: the role first, then reasoning_content deltas, then content and tool_calls deltas, one
    finish_reason per choice, an optional usage chunk, then [DONE] (OpenAI's streaming format)."""
    base = {**meta, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: list | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None,
                  "finish_reason": finish}
        return sse({**base, "choices": [choice], **extra})

    replies = [ReplyStream(in_reasoning, plan) for _ in range(n)]
    try:
        for index in range(n):
            yield chunk(index, {"role": "assistant", "content": ""})
        while not isinstance(event := await next_event(request, server.config.sse_ping_interval), Finished):
            if event is None:  # queued or in a long prefill: a comment keeps proxies and read timeouts waiting
                yield KEEP_ALIVE
                continue
            reply = replies[event.index]
            logprobs = server.chat_logprobs(event.token_ids, event.logprobs or [], top) if top is not None else None
            for delta in reply.feed(event.text, bool(event.finish_reason)):
                yield chunk(event.index, delta, logprobs=logprobs)
                logprobs = None  # a delta's logprobs ride on its first chunk
            if logprobs:
                yield chunk(event.index, {}, logprobs=logprobs)
            if event.finish_reason:
                server.engine.metrics.tool_calls.inc(reply.calls.sent if reply.calls is not None else 0)
                yield chunk(event.index, {}, reply.finish_reason(event.finish_reason))
        if include_usage:
            yield sse({**base, "choices": [], "usage": _usage(server, len(ids), event.output, in_reasoning)})
        yield sse("[DONE]")
    except APIError as exc:  # after the first byte an error can only travel in the stream
        yield sse(exc.body())
    finally:
        server.engine.release(request)
