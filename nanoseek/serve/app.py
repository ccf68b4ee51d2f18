"""`nanoseek serve`: an OpenAI- and DeepSeek-compatible HTTP server over the engine.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET /health,
GET /metrics (Prometheus), GET / (the chat page). Requests join the engine's running batch at every step
(continuous batching, `AsyncEngine`); each response reports DeepSeek's cache fields, and chat responses
split an R1-style reply into `reasoning_content` and `content`.

Documented behaviour where the API families differ (DeepSeek's API docs: models and
pricing, the reasoning model, multi-round conversation; OpenAI's API reference):
* `max_tokens` / `max_completion_tokens` (the smaller when both are given) cap all completion tokens,
  reasoning included (DeepSeek's V3.1+ semantics); a cap past the context is lowered to what fits. A prompt
  that does not fit is refused with 400 `context_length_exceeded`, never truncated.
* `--compat deepseek-r1` applies the reasoner's rules: temperature, top_p and the penalties are accepted and
  ignored (R1's recommended 0.6 / 0.95 apply), `logprobs` / `top_logprobs` and `reasoning_content` in input
  messages are refused with 400. The default (`openai`) honours every sampling parameter and drops
  `reasoning_content` from input messages. Earlier turns' reasoning never enters the prompt.
* `thinking: {"type": "disabled"}` closes the think block in the prompt, so the model answers directly.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import LLM, SamplingParams
from ..r1 import CONTENT, THINK_CLOSE, ReasoningParser, opens_think
from ..tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from . import COMPAT_MODES
from .engine import AsyncEngine, Delta, Finished, next_event
from .engine import Request as EngineRequest
from .protocol import APIError, ChatRequest, CompletionRequest, SamplingFields

STATIC = Path(__file__).parent / "static"
R1_SAMPLING = {"temperature": 0.6, "top_p": 0.95}  # DeepSeek-R1 model card's recommendation


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    compat: str = "openai"
    max_queue: int = 256


class Server:
    """What the handlers share: the engine loop, the tokenizer and the server's settings."""

    def __init__(self, llm: LLM, config: ServerConfig, model_path: str = ""):
        if config.compat not in COMPAT_MODES:
            raise ValueError(f"--compat = {config.compat!r}: one of {', '.join(COMPAT_MODES)}")
        if llm.tokenizer is None:
            raise ValueError("--model: serving needs a tokenizer in the checkpoint directory")
        self.llm, self.config, self.tokenizer = llm, config, llm.tokenizer
        self.engine = AsyncEngine(llm, config.max_queue)
        self.created = int(time.time())
        self.model_path = model_path
        self.think_close_id = self.tokenizer.token_id(THINK_CLOSE)
        identity = json.dumps([model_path, llm.model.config.to_dict(), str(llm.model.dtype), llm.max_model_len,
                               config.compat], sort_keys=True, default=str)
        self.fingerprint = "fp_" + hashlib.blake2b(identity.encode(), digest_size=6).hexdigest()

    # ---- prompts ------------------------------------------------------------------------------
    def chat_prompt(self, body: ChatRequest) -> tuple[list[int], bool]:
        """Token ids of the conversation, and whether the prompt leaves the model inside a think block."""
        if not self.tokenizer.chat_template:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        messages, prefix = [], ""
        for i, message in enumerate(body.messages):
            if message.role == "tool":
                raise APIError(400, f"messages[{i}].role = 'tool': this server has no tool calling",
                               f"messages[{i}].role")
            if (message.reasoning_content or message.reasoning) and self.config.compat == "deepseek-r1":
                raise APIError(400, f"messages[{i}].reasoning_content: remove the reasoning from earlier replies "
                               "before sending them back (DeepSeek-R1's rule)", f"messages[{i}].reasoning_content")
            if message.role == "assistant" and getattr(message, "prefix", False):
                if i != len(body.messages) - 1:
                    raise APIError(400, f"messages[{i}].prefix: only the last message may be a prefix",
                                   f"messages[{i}].prefix")
                prefix = message.text()  # DeepSeek's chat prefix completion: the reply continues this text
                continue
            role = "system" if message.role == "developer" else message.role
            messages.append({"role": role, "content": message.text()})  # reasoning never enters the prompt
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        in_reasoning = opens_think(text)
        if in_reasoning and (body.thinking or {}).get("type") == "disabled":
            text, in_reasoning = text + THINK_CLOSE + "\n", False
        ids = self.tokenizer.encode(text + prefix, add_special_tokens=False)
        return ids, in_reasoning

    def check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty", param)
        if len(ids) >= self.llm.max_model_len:
            raise APIError(400, f"{param}: the prompt has {len(ids)} tokens and this model's context is "
                           f"{self.llm.max_model_len} tokens, with room needed for at least one new token",
                           param, "context_length_exceeded")
        vocab = self.llm.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab})", param)

    # ---- sampling -----------------------------------------------------------------------------
    def sampling(self, body: SamplingFields, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                 reasoner_rules: bool = False) -> SamplingParams:
        if body.model != self.config.served_model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves "
                           f"{self.config.served_model_name!r}", "model", "model_not_found")
        if body.n > self.llm.max_num_seqs:
            raise APIError(400, f"n = {body.n}: this server runs at most {self.llm.max_num_seqs} sequences at once "
                           "(--max-num-seqs)", "n")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", "logit_bias")
        ignored = reasoner_rules and self.config.compat == "deepseek-r1"
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        room = self.llm.max_model_len - prompt_len
        try:
            return SamplingParams(
                n=body.n, max_tokens=min(max_tokens or room, room),
                temperature=R1_SAMPLING["temperature"] if ignored else _default(body.temperature, 1.0),
                top_p=R1_SAMPLING["top_p"] if ignored else _default(body.top_p, 1.0),
                top_k=_default(body.top_k, 0), min_p=_default(body.min_p, 0.0),
                presence_penalty=0.0 if ignored else _default(body.presence_penalty, 0.0),
                frequency_penalty=0.0 if ignored else _default(body.frequency_penalty, 0.0),
                repetition_penalty=_default(body.repetition_penalty, 1.0), stop=stop, seed=body.seed,
                logprobs=logprobs, ignore_eos=bool(body.ignore_eos))
        except ValueError as exc:  # SamplingParams.<name> = ...: names the field
            name = str(exc).split("=")[0].removeprefix("SamplingParams.").strip()
            raise APIError(400, str(exc), name) from exc

    # ---- output helpers -----------------------------------------------------------------------
    def usage(self, prompt_len: int, outputs: list, cached: int, reasoning: int) -> dict[str, Any]:
        completion = sum(len(o.token_ids) for o in outputs)
        return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion,
                "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt_len - cached,
                "prompt_tokens_details": {"cached_tokens": cached},
                "completion_tokens_details": {"reasoning_tokens": reasoning}}

    def reasoning_tokens(self, token_ids: list[int], in_reasoning: bool) -> int:
        """Tokens up to and including the one that closes the think block (all, if it never closes)."""
        if not in_reasoning:
            return 0
        if self.think_close_id is not None and self.think_close_id in token_ids:
            return token_ids.index(self.think_close_id) + 1
        return len(token_ids)

    def chat_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]], top: int) -> list[dict]:
        entries = []
        for token, options in zip(token_ids, logprobs, strict=False):
            ranked = sorted(((t, lp) for t, lp in options.items()), key=lambda item: -item[1])[:top]
            entries.append({**self._token_entry(token, options[token]),
                            "top_logprobs": [self._token_entry(t, lp) for t, lp in ranked]})
        return entries

    def _token_entry(self, token: int, logprob: float) -> dict[str, Any]:
        raw = self.tokenizer.token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": _finite(logprob), "bytes": list(raw)}

    def completion_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]], top: int,
                            offset: int) -> dict[str, Any]:
        tokens, values, tops, offsets = [], [], [], []
        for token, options in zip(token_ids, logprobs, strict=False):
            text = self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")
            tokens.append(text)
            values.append(_finite(options[token]))
            ranked = sorted(options.items(), key=lambda item: -item[1])[:top]
            tops.append({self.tokenizer.token_bytes(t).decode("utf-8", errors="replace"): _finite(lp)
                         for t, lp in ranked})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _default(value, default):
    return default if value is None else value


def _finite(value: float) -> float:
    return max(value, -9999.0)  # JSON has no -inf; OpenAI reports very unlikely tokens as -9999


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(server: Server, requests: list[EngineRequest], http: Request) -> list[Finished]:
    """The final outputs of `requests`; cancels them all if the client disconnects first."""
    async def finish(request: EngineRequest) -> Finished:
        while not isinstance(event := await next_event(request), Finished):
            pass
        return event

    work = asyncio.ensure_future(asyncio.gather(*(finish(r) for r in requests)))
    watcher = asyncio.ensure_future(_until_disconnected(http))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            raise asyncio.CancelledError
        return work.result()
    finally:
        watcher.cancel()
        for request in requests:
            server.engine.release(request)


def _stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- the app ---------------------------------------------------------------------------------------
def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        server.engine.start()
        yield
        server.engine.shutdown()

    app = FastAPI(title="nanoseek", version="0.1.0", lifespan=lifespan,
                  description="OpenAI- and DeepSeek-compatible API over the nanoseek engine")

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request body"}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return JSONResponse(APIError(400, message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    def authorized(request: Request) -> None:
        key = server.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {key}":
            raise APIError(401, "Incorrect API key provided" if header else "Missing API key: send "
                           "'Authorization: Bearer KEY'", code="invalid_api_key", kind="invalid_request_error")

    def model_card() -> dict[str, Any]:
        return {"id": server.config.served_model_name, "object": "model", "created": server.created,
                "owned_by": "nanoseek", "root": server.model_path, "max_model_len": server.llm.max_model_len}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != server.config.served_model_name:
            raise APIError(404, f"model {model_id!r} does not exist", "model", "model_not_found")
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        if not server.engine.healthy:
            return JSONResponse({"status": "error", "error": str(server.engine.error)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        cache = server.llm.runner.prefix_cache
        server.engine.metrics.cache_size.set(cache.cached_tokens if cache is not None else 0)
        return PlainTextResponse(generate_latest(server.engine.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, http: Request):
        return await _chat(server, body, http)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, http: Request):
        return await _completions(server, body, http)

    return app


# ---- chat ------------------------------------------------------------------------------------------
async def _chat(server: Server, body: ChatRequest, http: Request):
    if body.tools and body.tool_choice != "none":
        raise APIError(400, "tools: this server has no tool calling (send tool_choice 'none' or no tools)", "tools")
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, f"response_format.type = {body.response_format.type!r}: only 'text' is supported",
                       "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs = true", "top_logprobs")
    if server.config.compat == "deepseek-r1" and (body.logprobs or body.top_logprobs is not None):
        raise APIError(400, "logprobs: not supported by the reasoner (DeepSeek-R1's rule)", "logprobs")
    ids, in_reasoning = server.chat_prompt(body)
    server.check_prompt(ids, "messages")
    caps = [c for c in (body.max_tokens, body.max_completion_tokens) if c is not None]
    top = body.top_logprobs or 0
    params = server.sampling(body, len(ids), min(caps) if caps else None, top if body.logprobs else None,
                             reasoner_rules=in_reasoning)
    request = server.engine.submit(ids, params)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": server.config.served_model_name, "system_fingerprint": server.fingerprint}
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream_response(_chat_stream(server, request, meta, ids, in_reasoning, body.n, usage,
                                             top if body.logprobs else None))
    (finished,) = await _collect(server, [request], http)
    output = finished.output
    choices = []
    for completion in output.outputs:
        parser = ReasoningParser(in_reasoning)
        pieces = parser.feed(completion.text) + parser.finish()
        reasoning = "".join(text for kind, text in pieces if kind != CONTENT)
        content = "".join(text for kind, text in pieces if kind == CONTENT)
        message = {"role": "assistant", "content": content}
        if parser.had_reasoning:
            message["reasoning_content"] = reasoning
        logprobs = None
        if body.logprobs:
            logprobs = {"content": server.chat_logprobs(completion.token_ids, completion.logprobs or [], top)}
        choices.append({"index": completion.index, "message": message, "logprobs": logprobs,
                        "finish_reason": completion.finish_reason})
    reasoning = sum(server.reasoning_tokens(c.token_ids, in_reasoning) for c in output.outputs)
    return {**meta, "object": "chat.completion", "choices": choices,
            "usage": server.usage(len(ids), output.outputs, output.num_cached_tokens, reasoning)}


async def _chat_stream(server: Server, request: EngineRequest, meta: dict, ids: list[int], in_reasoning: bool,
                       n: int, include_usage: bool, top: int | None) -> AsyncIterator[str]:
    """SSE chunks: the role first, then reasoning_content deltas, then content deltas, one finish_reason per
    choice, an optional usage chunk, then [DONE] (OpenAI's streaming format)."""
    base = {**meta, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: list | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None,
                  "finish_reason": finish}
        return _sse({**base, "choices": [choice], **extra})

    parsers = [ReasoningParser(in_reasoning) for _ in range(n)]
    try:
        for index in range(n):
            yield chunk(index, {"role": "assistant", "content": ""})
        while not isinstance(event := await next_event(request), Finished):
            assert isinstance(event, Delta)
            parser = parsers[event.index]
            pieces = parser.feed(event.text) + (parser.finish() if event.finish_reason else [])
            logprobs = server.chat_logprobs(event.token_ids, event.logprobs or [], top) if top is not None else None
            for kind, text in pieces:
                yield chunk(event.index, {"content": text} if kind == CONTENT else {"reasoning_content": text},
                            logprobs=logprobs)
                logprobs = None
            if logprobs:
                yield chunk(event.index, {}, logprobs=logprobs)
            if event.finish_reason:
                yield chunk(event.index, {}, event.finish_reason)
        output = event.output
        if include_usage:
            reasoning = sum(server.reasoning_tokens(c.token_ids, in_reasoning) for c in output.outputs)
            yield _sse({**base, "choices": [],
                        "usage": server.usage(len(ids), output.outputs, output.num_cached_tokens, reasoning)})
        yield _sse("[DONE]")
    except APIError as exc:  # after the first byte an error can only travel in the stream
        yield _sse(exc.body())
    finally:
        server.engine.release(request)


# ---- completions -----------------------------------------------------------------------------------
def _completion_prompts(server: Server, body: CompletionRequest) -> list[list[int]]:
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


async def _completions(server: Server, body: CompletionRequest, http: Request):
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, f"best_of = {body.best_of}: only best_of = n is supported", "best_of")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo: prompt log-probabilities are not supported; drop echo or logprobs", "echo")
    prompts = _completion_prompts(server, body)
    max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's legacy default
    params = [server.sampling(body, len(p), max_tokens, body.logprobs) for p in prompts]
    if body.n * len(prompts) > server.llm.max_num_seqs + server.config.max_queue:
        raise APIError(400, f"prompt: {len(prompts)} prompts x n = {body.n} exceed the server's capacity", "prompt")
    requests = [server.engine.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
    echoes = [server.tokenizer.decode(p) if body.echo else "" for p in prompts]
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.config.served_model_name,
            "system_fingerprint": server.fingerprint}
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream_response(_completion_stream(server, requests, meta, prompts, echoes, body.n, usage,
                                                   body.logprobs))
    finished = await _collect(server, requests, http)
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


async def _completion_stream(server: Server, requests: list[EngineRequest], meta: dict, prompts: list[list[int]],
                             echoes: list[str], n: int, include_usage: bool, top: int | None) -> AsyncIterator[str]:
    base = {**meta, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}
    events: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, request: EngineRequest) -> None:
        while True:
            event = await next_event(request)
            await events.put((p, event))
            if isinstance(event, Finished):
                return

    pumps = [asyncio.ensure_future(pump(p, r)) for p, r in enumerate(requests)]
    offsets = {}
    try:
        for p, echo in enumerate(echoes):
            for j in range(n):
                offsets[p * n + j] = len(echo)
                if echo:
                    yield _sse({**base, "choices": [{"index": p * n + j, "text": echo, "logprobs": None,
                                                     "finish_reason": None}], **extra})
        outputs, cached, remaining = [], 0, len(requests)
        while remaining:
            p, event = await events.get()
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
            yield _sse({**base, "choices": [{"index": index, "text": event.text, "logprobs": logprobs,
                                             "finish_reason": event.finish_reason}], **extra})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": server.usage(sum(len(p) for p in prompts), outputs, cached, 0)})
        yield _sse("[DONE]")
    except APIError as exc:
        yield _sse(exc.body())
    finally:
        for task in pumps:
            task.cancel()
        for request in requests:
            server.engine.release(request)


# ---- the command ---------------------------------------------------------------------------------------
def build_server(args: argparse.Namespace) -> Server:
    if args.max_queue < 0:
        raise ValueError(f"--max-queue = {args.max_queue}: must be >= 0")
    llm = LLM(args.model, device=args.device, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
              speculative=args.speculative, prefix_cache_tokens=0 if args.speculative else args.prefix_cache_tokens)
    config = ServerConfig(args.served_model_name or str(args.model), args.api_key, args.compat, args.max_queue)
    return Server(llm, config, str(args.model))


def run(args: argparse.Namespace) -> int:
    import uvicorn

    server = build_server(args)
    print(f"serving {server.config.served_model_name!r} on http://{args.host}:{args.port} "
          f"(OpenAI base_url http://{args.host}:{args.port}/v1; chat page at /)", flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level)
    return 0
