"""What both handlers do with a request's events: SSE framing of a stream, and collecting the final outputs
of a non-streaming request (cancelled when its client disconnects)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from .bridge import AsyncEngine, Finished, next_event
from .bridge import Request as EngineRequest

KEEP_ALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it (the WHATWG event-stream format)


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def collect(engine: AsyncEngine, requests: list[EngineRequest], http: Request) -> list[Finished]:
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
            engine.release(request)


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
