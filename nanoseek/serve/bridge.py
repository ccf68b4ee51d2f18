"""The bridge between asyncio handlers and the engine: `AsyncEngine` runs the engine's continuous-batching loop
on its own thread; `Request`, `Delta` and `Finished` carry work to it and output back; `Metrics` holds the
Prometheus series it updates.

Handlers submit checked requests and read their output as events from an asyncio queue; the engine thread adds
requests, runs `LLM.step` while anything is queued or running, and posts each completion's new text and
tokens after every step. An abort is applied before the next step, so a disconnected client's cache slot
is free within one step.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..engine import LLM, SamplingParams
from ..engine.sequence import RequestOutput
from .protocol import APIError

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)


class Metrics:
    """Prometheus series, in a registry of the server's own (several servers may live in one process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("nanoseek_requests", "Finished requests", ["finish_reason"], registry=r)
        self.rejected = Counter("nanoseek_requests_rejected", "Requests refused with 429: queue full", registry=r)
        self.aborted = Counter("nanoseek_requests_aborted", "Requests cancelled before they finished", registry=r)
        self.prompt_tokens = Counter("nanoseek_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("nanoseek_generation_tokens", "Tokens generated", registry=r)
        self.cache_hits = Counter("nanoseek_prefix_cache_hit_tokens", "Prompt tokens served by the prefix cache",
                                  registry=r)
        self.cache_queries = Counter("nanoseek_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix "
                                     "cache", registry=r)
        self.waiting = Gauge("nanoseek_num_requests_waiting", "Requests queued for a cache slot", registry=r)
        self.running = Gauge("nanoseek_num_requests_running", "Requests in the running batch", registry=r)
        self.cache_size = Gauge("nanoseek_prefix_cache_tokens", "Prompt tokens held by the prefix cache",
                                registry=r)
        self.slots_used = Gauge("nanoseek_cache_slots_used", "Latent-cache slots held by running sequences",
                                registry=r)
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("nanoseek_inter_token_latency_seconds", "Time between a request's output steps",
                             registry=r, buckets=LATENCY_BUCKETS)
        self.latency = Histogram("nanoseek_request_latency_seconds", "Time from arrival to the last token",
                                 registry=r, buckets=LATENCY_BUCKETS)
        self.constrained = Counter("nanoseek_constrained_requests", "Requests decoded under a grammar "
                                   "(response_format, forced tool calls)", registry=r)
        self.tool_calls = Counter("nanoseek_tool_calls_parsed", "Tool calls read out of replies", registry=r)
        self.grammar = Histogram("nanoseek_grammar_mask_seconds", "Time per engine step spent computing the "
                                 "grammars' token masks (steps with constrained sequences)", registry=r,
                                 buckets=(0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1))


@dataclass
class Delta:
    """One completion's new output since the previous event."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    prompt_logprobs: list[dict[int, float] | None] | None = None  # on a completion's first event, if asked


@dataclass
class Finished:
    output: RequestOutput


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    id: str = ""  # the engine's request id, set on the engine thread
    arrival: float = field(default_factory=time.perf_counter)
    last_output: float | None = None
    done: bool = False

    def post(self, event: Delta | Finished) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class AsyncEngine:
    def __init__(self, llm: LLM, max_queue: int = 256):
        self.llm = llm
        self.max_queue = max_queue
        self.metrics = Metrics()
        self.commands: queue.Queue = queue.Queue()
        self.active: dict[str, Request] = {}  # engine thread only
        self.outstanding = 0  # requests submitted and not yet finished or aborted (event-loop side)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
        self._ids = itertools.count()

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self.commands.put(None)
        self._thread.join(timeout=10)

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # ---- the event-loop side -------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request that passed `LLM.check` (the engine thread checks it again, and a refusal there would
        stop the loop), or refuse it with 429 when the queue is full."""
        if not self.healthy:
            raise APIError(503, "the engine has stopped; see the server log", code="engine_dead")
        if self.outstanding >= self.llm.max_num_seqs + self.max_queue:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is at capacity ({self.outstanding} requests in flight); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"})
        request = Request(prompt_ids, params, asyncio.Queue(), asyncio.get_running_loop())
        self.outstanding += 1
        if params.structured is not None:
            self.metrics.constrained.inc()
        self.commands.put(("add", request))
        return request

    def release(self, request: Request) -> None:
        """The handler is done with `request`: abort it if it is still generating (a client went away)."""
        self.outstanding -= 1
        if not request.done:
            request.done = True
            self.metrics.aborted.inc()
            self.commands.put(("abort", request))

    # ---- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_commands(block=not self.llm.scheduler.busy)
                if self.llm.scheduler.busy:
                    self._step()
                self._update_gauges()
        except BaseException as exc:  # noqa: BLE001 - reported by /health and to every waiting request
            self.error = exc
            for request in self.active.values():
                request.post(exc)
            raise

    def _apply_commands(self, block: bool) -> None:
        while True:
            try:
                command = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
            except queue.Empty:
                return
            if command is None:
                return
            action, request = command
            if action == "add" and not request.done:
                request.id = self.llm.add_request(request.prompt_ids, request.params)
                self.active[request.id] = request
            elif action == "abort" and request.id in self.active:
                self.llm.abort(request.id)
                del self.active[request.id]
            block = False

    def _step(self) -> None:
        masking = self.llm.grammars.mask_seconds
        moved = self.llm.step()
        if self.llm.grammars.mask_seconds > masking:
            self.metrics.grammar.observe(self.llm.grammars.mask_seconds - masking)
        now = time.perf_counter()
        metrics = self.metrics
        for request_id in {s.request_id for s in moved}:
            request = self.active.get(request_id)
            if request is None:
                continue
            group = self.llm.requests[request_id]
            first = request.last_output is None
            if first:
                metrics.ttft.observe(now - request.arrival)
                metrics.prompt_tokens.inc(len(request.prompt_ids))
                metrics.cache_hits.inc(group[0].cached_tokens)
                metrics.cache_queries.inc(len(request.prompt_ids))
            else:
                metrics.itl.observe(now - request.last_output)
            request.last_output = now
            for seq in group:
                sent = seq.streamed_tokens
                text, tokens = seq.stream_delta()
                if text or tokens or (seq.finished and not seq.reported):
                    seq.reported = seq.finished
                    logprobs = seq.logprobs[sent: sent + len(tokens)] if seq.logprobs is not None else None
                    metrics.generation_tokens.inc(len(tokens))
                    request.post(Delta(seq.index, text, tokens, logprobs, seq.finish_reason,
                                       group[0].prompt_logprobs if first else None))
            if all(s.finished for s in group):
                output = self.llm.output(request_id)
                self.llm.abort(request_id)  # forgets the finished request
                del self.active[request_id]
                request.done = True
                for completion in output.outputs:
                    metrics.requests.labels(completion.finish_reason or "abort").inc()
                metrics.latency.observe(now - request.arrival)
                request.post(Finished(output))

    def _update_gauges(self) -> None:
        metrics, scheduler = self.metrics, self.llm.scheduler
        metrics.waiting.set(sum(1 for _ in scheduler.waiting))
        metrics.running.set(len({s.request_id for s in scheduler.running}))
        metrics.slots_used.set(len(scheduler.running))


async def next_event(request: Request, timeout: float | None = None) -> Delta | Finished | None:
    """The request's next event; None when `timeout` seconds pass without one (nothing is lost: an event
    that comes later waits in the queue)."""
    try:
        event = await asyncio.wait_for(request.events.get(), timeout)
    except TimeoutError:
        return None
    if isinstance(event, BaseException):
        raise APIError(500, f"the engine failed: {event}", kind="server_error", code="engine_error")
    return event
