"""`nanoseek serve`: an OpenAI- and DeepSeek-compatible HTTP server over the engine.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both also under DeepSeek's beta base URL,
/beta), GET /v1/models[/{id}], POST /tokenize and /detokenize (vLLM's), GET /health, GET /metrics
(Prometheus), GET / (the chat page). Requests join the engine's running batch at every step (continuous
batching, `AsyncEngine`); each response reports DeepSeek's cache fields, and chat responses split an R1-style
reply into `reasoning_content` and `content`.

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
* `logit_bias` is added to the logits before penalties and sampling, greedy rows included; the log-probs
  reported are the model's own, before any processing (vLLM's default). `echo` with `logprobs` scores the
  prompt (the prompt's tokens first in `logprobs`, the first one null), and `max_tokens: 0` with `echo`
  returns the prompt alone; such a prompt runs whole, past the prefix cache.
* `response_format` `json_object` / `json_schema` constrain the reply by a grammar (`engine/structured.py`);
  `strict` schemas must keep strict mode's rules (every property required, additionalProperties false).
  After an R1 prompt the grammar starts when the think block closes, which it must within half the reply's
  tokens (then `</think>` is the only token allowed): a reasoning budget, so that the JSON or forced call
  comes whatever the weights.
* Tools (`tools.py`): listed by the template when it renders `tools`, else in a system message; the reply's
  calls are parsed in the family's syntax (DeepSeek-V3's tokens or Hermes's tags). `tool_choice` `required`
  or a named function is a grammar over the functions' schemas; under `auto` only strict functions are held to
  their schemas (the others to any object), once the model writes DeepSeek's call opener (a single token).
  Arguments are the text the model wrote, streamed piece by piece (unchecked without a grammar, as OpenAI's
  are); a reply with calls has `content` null unless text came first. A call cut off by the token limit is
  content in a whole reply, while a stream has sent its fragments so far (finish_reason `length` either way).
* The front door: a body over `--max-request-bytes` gets 413 and one that is not UTF-8 a 400 (`BodyCheck`),
  a lone surrogate or NUL anywhere in the body a 400 naming its place (`protocol.check_text`); prompts are
  tokenised on a worker thread; a stream with no event for `--sse-ping-interval` seconds gets an SSE comment.

This file owns the app: its routes, authorization, error handlers and the engine loop's lifespan, and the
command (`build_server`, `run`). The endpoints' work is in `chat.py` and `completions.py`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine import LLM
from .chat import chat_completion
from .completions import completion
from .protocol import APIError, BadText, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .server import Server, ServerConfig
from .tokens import detokenize, tokenize

STATIC = Path(__file__).parent / "static"


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        server.engine.start()
        yield
        server.engine.shutdown()

    app = FastAPI(title="nanoseek", version="0.1.0", lifespan=lifespan,
                  description="OpenAI- and DeepSeek-compatible API over the nanoseek engine")
    _add_error_handlers(app)
    app.add_middleware(BodyCheck, max_bytes=server.config.max_request_bytes)
    authorized = _authorization(server.config.api_key)
    _add_model_routes(app, server, authorized)
    _add_service_routes(app, server)

    # DeepSeek's beta features (chat prefix completion, FIM) live under base_url .../beta; here they are on
    # both: /beta routes are the /v1 ones under DeepSeek's base URL
    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    @app.post("/beta/chat/completions", dependencies=[Depends(authorized)], include_in_schema=False)
    async def chat_completions(body: ChatRequest, http: Request):
        return await chat_completion(server, body, http)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    @app.post("/beta/completions", dependencies=[Depends(authorized)], include_in_schema=False)
    async def completions(body: CompletionRequest, http: Request):
        return await completion(server, body, http)

    @app.post("/tokenize", dependencies=[Depends(authorized)])
    async def tokenize_route(body: TokenizeRequest):
        return await tokenize(server, body)

    @app.post("/detokenize", dependencies=[Depends(authorized)])
    async def detokenize_route(body: DetokenizeRequest):
        return await detokenize(server, body)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, whoever raised it: a handler, request validation, or routing."""
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request body"}
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, BadText):
            return JSONResponse(APIError(400, str(cause), cause.param).body(), status_code=400)
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return JSONResponse(APIError(400, message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


class BodyCheck:
    """ASGI middleware before the routes: a request body over `max_bytes` gets 413 and one that is not UTF-8
    (RFC 8259 §8.1) a 400 naming the offset, before anything parses it. An oversized body is read on (up to 4x
    the limit) and discarded, so that a client still sending sees the answer rather than a reset connection."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        parts, size, more = [], 0, True
        while more and size <= 4 * self.max_bytes:  # past that, answer and let the connection close
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_bytes:
                parts.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(parts)
        error = None
        if size > self.max_bytes:
            error = APIError(413, f"body: {'over ' if more else ''}{size} bytes exceed the server's limit of "
                             f"{self.max_bytes} (--max-request-bytes)", "body", "request_too_large")
        else:
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:
                error = APIError(400, f"body: not UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})",
                                 "body", "invalid_encoding")
        if error is not None:
            return await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect a handler may wait for
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _authorization(api_key: str | None) -> Callable[[Request], None]:
    """The check of `Authorization: Bearer KEY` on the /v1 routes (none without an API key)."""
    def authorized(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {api_key}":
            raise APIError(401, "Incorrect API key provided" if header else "Missing API key: send "
                           "'Authorization: Bearer KEY'", code="invalid_api_key", kind="invalid_request_error")

    return authorized


def _add_model_routes(app: FastAPI, server: Server, authorized: Callable[[Request], None]) -> None:
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


def _add_service_routes(app: FastAPI, server: Server) -> None:
    """The routes outside the API, open without a key: health, metrics and the chat page."""
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


# ---- the command ---------------------------------------------------------------------------------------
def build_server(args: argparse.Namespace) -> Server:
    if args.max_queue < 0:
        raise ValueError(f"--max-queue = {args.max_queue}: must be >= 0")
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes = {args.max_request_bytes}: must be >= 1")
    if not args.sse_ping_interval > 0:  # NaN too
        raise ValueError(f"--sse-ping-interval = {args.sse_ping_interval}: must be > 0")
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len, speculative=args.speculative,
              prefix_cache_tokens=0 if args.speculative else args.prefix_cache_tokens, quantize=args.quantize,
              compile=args.compile, index_cache_dtype=args.index_cache_dtype)
    config = ServerConfig(args.served_model_name or str(args.model), args.api_key, args.compat, args.max_queue,
                          args.max_request_bytes, args.sse_ping_interval)
    return Server(llm, config, str(args.model))


def run(args: argparse.Namespace) -> int:
    import uvicorn

    server = build_server(args)
    print(f"serving {server.config.served_model_name!r} on http://{args.host}:{args.port} "
          f"(OpenAI base_url http://{args.host}:{args.port}/v1; chat page at /)", flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level)
    return 0
