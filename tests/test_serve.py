"""`nanoseek serve` as a real subprocess on 127.0.0.1, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import make_tokenizer, nanoseek_model

from nanoseek.engine import LLM, EngineError, SamplingParams
from nanoseek.r1 import THINK_CLOSE, split_reply
from nanoseek.tasks.corpus import generate_corpus
from nanoseek.tokenizer import train_tokenizer

KEY = "sk-test"
MODEL = "tiny-r1"
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


def write_checkpoint(path: Path) -> Path:
    """A random tiny model with nanoseek's real byte-level tokenizer and R1 chat template."""
    tokenizer = train_tokenizer(generate_corpus(300), vocab_size=320)
    nanoseek_model(seed=3, vocab_size=320, max_position_embeddings=4096).save_pretrained(path)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


class Server:
    def __init__(self, model: Path, *args: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nanoseek", "serve", "--model", str(model), "--port", str(self.port),
             "--served-model-name", MODEL, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stdout.read()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server did not become healthy")

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=kwargs.pop("api_key", KEY), **kwargs)

    def metric(self, name: str) -> float:
        text = httpx.get(self.base + "/metrics").text
        values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
                  or line.startswith(name + "{")]
        return sum(values)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def server(checkpoint):
    server = Server(checkpoint, "--api-key", KEY, "--max-num-seqs", "8", "--max-model-len", "2048")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def engine(checkpoint) -> LLM:
    """The same checkpoint in-process: the reference for what the server must return."""
    return LLM(checkpoint, device="cpu", max_num_seqs=8, max_model_len=2048)


def chat_prompt(engine: LLM, messages=MESSAGES) -> list[int]:
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages), add_special_tokens=False)


@pytest.fixture(scope="module")
def thinking_seed(engine) -> tuple[int, str]:
    """A seed whose sampled reply closes the think block mid-way, and that reply's raw text."""
    prompt = chat_prompt(engine)
    for seed in range(200):
        params = SamplingParams(temperature=1.0, max_tokens=40, seed=seed, skip_special_tokens=True)
        text = engine.generate(prompt, params)[0].outputs[0].text
        at = text.find(THINK_CLOSE)
        if 0 < at and len(text) - at > 12:
            return seed, text
    pytest.fail("no seed in 0..199 closes the think block")


# ---- models, chat, completions ------------------------------------------------------------------------
def test_models(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_splits_reasoning_from_content(server, thinking_seed):
    seed, raw = thinking_seed
    reasoning, _, answer = raw.partition(THINK_CLOSE)
    response = server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, seed=seed)
    message = response.choices[0].message
    assert message.reasoning_content == reasoning and message.content == answer
    assert response.id.startswith("chatcmpl-") and response.model == MODEL and response.system_fingerprint
    usage = response.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens
    assert usage.prompt_cache_hit_tokens + usage.prompt_cache_miss_tokens == usage.prompt_tokens


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream(server, thinking_seed, include_usage):
    seed, raw = thinking_seed
    reasoning, _, answer = raw.partition(THINK_CLOSE)
    stream = server.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=40, seed=seed, stream=True,
        stream_options={"include_usage": True} if include_usage else None)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == answer
    # reasoning first, then content: no reasoning delta after the first content delta
    kinds = ["r" if getattr(d, "reasoning_content", None) else "c" for d in deltas if d.content or
             getattr(d, "reasoning_content", None)]
    assert "".join(kinds) == "r" * kinds.count("r") + "c" * kinds.count("c")
    assert sum(1 for c in chunks for ch in c.choices if ch.finish_reason) == 1
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
        assert all(c.usage is None for c in chunks[:-1])
    else:
        assert all(c.choices and c.usage is None for c in chunks)


def test_stream_framing(server):
    """Raw SSE: `data: {json}` events, each a chat.completion.chunk, ending with `data: [DONE]`."""
    with httpx.stream("POST", server.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event[6:])["object"] == "chat.completion.chunk"


def test_n_and_seed(server, engine):
    prompt = chat_prompt(engine)
    expected = [o.text for o in engine.generate(prompt, SamplingParams(n=3, temperature=1.0, max_tokens=12,
                                                                      seed=11))[0].outputs]
    response = server.client().chat.completions.create(model=MODEL, messages=MESSAGES, n=3, max_tokens=12, seed=11)
    assert [c.index for c in response.choices] == [0, 1, 2]
    split = [(c.message.reasoning_content or "", c.message.content or "") for c in response.choices]
    assert split == [(text.partition(THINK_CLOSE)[0], text.partition(THINK_CLOSE)[2]) for text in expected]


def test_seed_is_independent_of_concurrency(server):
    client = server.client()

    def ask(seed):
        return client.completions.create(model=MODEL, prompt="the answer is", max_tokens=16, seed=seed,
                                         temperature=1.0).choices[0].text

    alone = ask(5)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, [5, 1, 2, 5, 3, 5]))
    assert results[0] == results[3] == results[5] == alone


def test_completions_stop_and_max_tokens(server):
    client = server.client()
    full = client.completions.create(model=MODEL, prompt="what is 2 + 3?", max_tokens=24, temperature=0)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and full.usage.completion_tokens == 24
    assert full.id.startswith("cmpl-") and full.object == "text_completion"
    text = choice.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = client.completions.create(model=MODEL, prompt="what is 2 + 3?", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    batch = client.completions.create(model=MODEL, prompt=["hello", "the cat"], n=2, max_tokens=4)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    echo = client.completions.create(model=MODEL, prompt="hello there", max_tokens=3, echo=True)
    assert echo.choices[0].text.startswith("hello there")


def test_chat_logprobs(server, engine):
    response = server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, logprobs=True,
                                                       top_logprobs=3, temperature=1.0, seed=2)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens == 10
    expected = engine.generate(chat_prompt(engine), SamplingParams(max_tokens=10, temperature=1.0, seed=2,
                                                                   logprobs=3))[0].outputs[0]
    assert [bytes(e.bytes) for e in entries] == [engine.tokenizer.token_bytes(t) for t in expected.token_ids]
    for entry, token, options in zip(entries, expected.token_ids, expected.logprobs, strict=True):
        assert entry.logprob == pytest.approx(options[token], abs=1e-4)
        assert len(entry.top_logprobs) == 3 and entry.logprob <= entry.top_logprobs[0].logprob + 1e-6
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                  reverse=True)


def test_completion_logprobs(server):
    response = server.client().completions.create(model=MODEL, prompt="the cat", max_tokens=6, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert logprobs.text_offset == sorted(logprobs.text_offset) and all(len(t) <= 2 for t in logprobs.top_logprobs)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(server, engine, stream):
    """The legacy API's prompt scoring (what lm-eval's log-likelihoods read): the echoed prompt's tokens with
    their log-probabilities, the first null, equal to LLM's prompt_logprobs and to a forward pass."""
    prompt = engine.tokenizer.encode("the cat sat on")
    reference = engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))[0]
    with torch.no_grad():
        forward = engine.model(torch.tensor([prompt])).float().log_softmax(-1)[0]
    assert all(abs(reference.prompt_logprobs[i][t] - forward[i - 1, t].item()) < 1e-4
               for i, t in enumerate(prompt) if i)
    client = server.client()
    for max_tokens in (1, 0):  # 0: the prompt alone
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, echo=True,
                                             logprobs=2, temperature=0, stream=stream)
        choices = [c.choices[0] for c in response] if stream else response.choices
        values = [v for c in choices if c.logprobs for v in c.logprobs.token_logprobs]
        tops = [t for c in choices if c.logprobs for t in c.logprobs.top_logprobs]
        assert len(values) == len(prompt) + max_tokens and values[0] is None and tops[0] is None
        assert all(abs(values[i] - reference.prompt_logprobs[i][t]) < 1e-5 for i, t in enumerate(prompt) if i)
        ranked = zip(tops[1:], values[1:], strict=True)  # top-2 by text: tokens of one text share an entry
        assert all(1 <= len(top) <= 2 and max(top.values()) >= value for top, value in ranked)
        text = "".join(c.text for c in choices)
        assert text.startswith(engine.tokenizer.decode(prompt)) and choices[-1].finish_reason == "length"
        assert (text == engine.tokenizer.decode(prompt)) == (max_tokens == 0)


def test_echoed_text_offsets_count_characters(server):
    """A character split over byte-level tokens counts once: offsets never run past the text they index."""
    reply = server.client().completions.create(model=MODEL, prompt="née à Zürich, 東京", max_tokens=4, echo=True,
                                               logprobs=1, temperature=0).choices[0]
    offsets = reply.logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[-1] <= len(reply.text)
    assert reply.text.startswith("née à Zürich, 東京")


def test_logit_bias_bans_a_token(server, engine):
    """A bias of -100 on the greedy reply's first token keeps it out of the reply, in chat and completions."""
    client, greedy = server.client(), SamplingParams(max_tokens=8, temperature=0)
    for chat in (True, False):
        prompt = chat_prompt(engine) if chat else engine.tokenizer.encode("the cat")
        first = engine.generate(prompt, greedy)[0].outputs[0].token_ids[0]
        raw = engine.tokenizer.token_bytes(first)
        unwanted = list(raw) if chat else raw.decode("utf-8", errors="replace")
        for bias in ({}, {str(first): -100}):
            if chat:
                reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                                       logprobs=True, logit_bias=bias)
                replied = [entry.bytes for entry in reply.choices[0].logprobs.content]
            else:
                reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                                  logprobs=0, logit_bias=bias)
                replied = reply.choices[0].logprobs.tokens
            assert (replied[0] == unwanted) == (not bias) and (unwanted in replied) == (not bias)
    with pytest.raises(openai.BadRequestError) as outside:
        client.completions.create(model=MODEL, prompt="a", max_tokens=2, logit_bias={"320": 5})
    assert outside.value.body["param"] == "logit_bias"


def test_tokenize_and_detokenize(server, engine):
    headers = {"Authorization": f"Bearer {KEY}"}

    def post(path: str, **body) -> httpx.Response:
        return httpx.post(server.base + path, json=body, headers=headers)

    tokens = post("/tokenize", model=MODEL, prompt="the cat").json()
    assert tokens["tokens"] == engine.tokenizer.encode("the cat") and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == 2048
    assert post("/tokenize", messages=MESSAGES).json()["tokens"] == chat_prompt(engine)
    assert post("/detokenize", tokens=tokens["tokens"]).json()["prompt"] == engine.tokenizer.decode(
        tokens["tokens"], skip_special_tokens=False)
    for path, body, param in (("/detokenize", {"tokens": [5, 320]}, "tokens.1"), ("/tokenize", {}, "prompt"),
                              ("/tokenize", {"prompt": "a", "model": "gpt-4"}, "model")):
        refused = post(path, **body)
        assert refused.status_code in (400, 404) and error_of(refused)["param"] == param
    assert httpx.post(server.base + "/tokenize", json={"prompt": "a"}).status_code == 401


def test_fim_with_the_models_own_tokens_under_the_beta_base_url(server, engine):
    """DeepSeek's FIM completion (POST /beta/completions with a suffix): the prompt is the tokenizer's own FIM
    tokens around prefix and suffix, and the reply is the middle."""
    beta = openai.OpenAI(base_url=server.base + "/beta", api_key=KEY)
    reply = beta.completions.create(model=MODEL, prompt="def add(a, b):\n", suffix="\n    return c", max_tokens=6,
                                    temperature=0)
    fim = engine.tokenizer.fim_prompt("def add(a, b):\n", "\n    return c")
    assert fim == "<|fim_prefix|>def add(a, b):\n<|fim_suffix|>\n    return c<|fim_middle|>"
    ids = engine.tokenizer.encode(fim)
    expected = engine.generate(ids, SamplingParams(max_tokens=6, temperature=0))[0].outputs[0]
    assert reply.choices[0].text == expected.text and reply.usage.prompt_tokens == len(ids)
    with pytest.raises(openai.BadRequestError) as token_ids:
        beta.completions.create(model=MODEL, prompt=[5, 6], suffix="x", max_tokens=2)
    assert token_ids.value.body["param"] == "suffix"


def test_fim_tokens_by_family():
    from tokenizers import AddedToken

    deepseek = make_tokenizer()
    deepseek.backend.add_tokens([AddedToken(t, special=True) for t in ("<｜fim▁begin｜>", "<｜fim▁hole｜>",
                                                                       "<｜fim▁end｜>")])
    assert deepseek.fim_prompt("a", "b") == "<｜fim▁begin｜>a<｜fim▁hole｜>b<｜fim▁end｜>"
    assert make_tokenizer().fim_prompt("a", "b") is None


@pytest.mark.parametrize("prefill", ["answer", "reasoning"])
def test_chat_prefix_completion_continues_the_last_message(server, engine, prefill):
    """DeepSeek's chat prefix completion: the reply continues the last assistant message. The R1 template opens
    a think block, so an answer prefix closes it first (with the message's reasoning in it, if any); a prefix
    of reasoning alone continues inside it."""
    last = {"role": "assistant", "prefix": True, "content": "The answer is", "reasoning_content": "2 and 3"} \
        if prefill == "answer" else {"role": "assistant", "prefix": True, "content": "", "reasoning_content": "So"}
    beta = openai.OpenAI(base_url=server.base + "/beta", api_key=KEY)
    reply = beta.chat.completions.create(model=MODEL, messages=[*MESSAGES, last], max_tokens=8, temperature=0)
    opened = engine.tokenizer.apply_chat_template(MESSAGES)
    assert opened.endswith("<think>\n")
    text = opened + ("2 and 3\n</think>\nThe answer is" if prefill == "answer" else "So")
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    raw = engine.generate(ids, SamplingParams(max_tokens=8, temperature=0, skip_special_tokens=True))[0].outputs[0]
    message = reply.choices[0].message
    assert reply.usage.prompt_tokens == len(ids)
    reasoning, content = split_reply(raw.text, prefill == "reasoning")
    assert (getattr(message, "reasoning_content", None), message.content) == (reasoning, content)
    assert (reasoning is None) == (prefill == "answer")
    with pytest.raises(openai.BadRequestError) as early:
        beta.chat.completions.create(model=MODEL, messages=[last, *MESSAGES], max_tokens=2)
    assert early.value.body["param"] == "messages[0].prefix"


def test_prefix_cache_hits(server):
    client = server.client()
    system = {"role": "system", "content": "You are a careful assistant. " * 8}
    messages = [system, {"role": "user", "content": "What is 1 + 1?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert second.usage.prompt_cache_hit_tokens >= 32 and second.usage.prompt_cache_hit_tokens % 16 == 0
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_cache_hit_tokens
    assert second.choices[0].message == first.choices[0].message
    assert server.metric("nanoseek_prefix_cache_hit_tokens_total") >= 32


# ---- errors ----------------------------------------------------------------------------------------------
def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


@pytest.mark.parametrize(("body", "param"), [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"tools": [{"type": "function"}]}, "tools.0"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
])
def test_invalid_parameters_are_400(server, body, param):
    request = {"model": MODEL, "messages": MESSAGES, **body}
    response = httpx.post(server.base + "/v1/chat/completions", json=request,
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"].startswith(param) and error["type"] == "invalid_request_error"


def test_error_statuses(server):
    client = server.client(max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    missing = httpx.get(server.base + "/v1/models")
    assert missing.status_code == 401 and error_of(missing)["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert unknown.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=MODEL, prompt=list(range(3, 300)) * 7, max_tokens=4)
    assert long.value.body["code"] == "context_length_exceeded"
    garbage = httpx.post(server.base + "/v1/chat/completions", content=b"{not json",
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert garbage.status_code == 400 and error_of(garbage)
    assert httpx.get(server.base + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize(("path", "raw", "param", "code"), [
    ("/v1/chat/completions", rb'"messages": [{"role": "user", "content": "hi \ud800"}]', "messages.0.content", None),
    ("/v1/chat/completions", rb'"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]',
     "messages.0.content.0.text", None),
    ("/v1/chat/completions", rb'"messages": [{"role": "user", "content": "a\u0000b"}]', "messages.0.content", None),
    ("/v1/chat/completions", b'"messages": [{"role": "user", "content": "\xff\xfe"}]', "body", "invalid_encoding"),
    ("/v1/completions", rb'"prompt": ["ok", "\udc00"]', "prompt.1", None),
    ("/v1/completions", rb'"prompt": "ok", "stop": ["\ud800"]', "stop.0", None),
    ("/v1/completions", rb'"prompt": "ok", "logit_bias": {"\ud800": 1}', "logit_bias.\\ud800", None),
    ("/v1/completions", rb'"prompt": "ok", "some_extra": {"x": "\u0000"}', "some_extra.x", None),
])
def test_strings_that_are_not_text_are_400(server, path, raw, param, code):
    """A lone surrogate (valid JSON, not Unicode), NUL or bytes that are not UTF-8, anywhere in the body, get a
    400 naming their place; no 500 from the tokenizer or the response's encoder."""
    body = b'{"model": "' + MODEL.encode() + b'", "max_tokens": 2, ' + raw + b"}"
    response = httpx.post(server.base + path, content=body,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert (error["param"], error["code"]) == (param, code), error


def test_a_huge_body_is_413_and_a_huge_prompt_stalls_no_one(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 20_000_000}]}
    refused = httpx.post(server.base + "/v1/chat/completions", json=huge, headers=headers, timeout=60)
    assert refused.status_code == 413 and error_of(refused)["code"] == "request_too_large"
    finished = []

    def long_prompt() -> None:  # about 3 MB under the 8 MiB limit: seconds of tokenising, then a 400
        response = httpx.post(server.base + "/v1/chat/completions", headers=headers, timeout=120, json={
            "model": MODEL, "messages": [{"role": "user", "content": "the fox 12 + 7 = 19. " * 150_000}]})
        finished.append(("long", response.status_code))

    sender = threading.Thread(target=long_prompt)
    sender.start()
    time.sleep(0.5)  # the body is in; the server is tokenising it
    finished.append(("health", httpx.get(server.base + "/health", timeout=30).status_code))
    short = httpx.post(server.base + "/v1/completions", headers=headers, timeout=30,
                       json={"model": MODEL, "prompt": "hello", "max_tokens": 2})
    finished.append(("short", short.status_code))
    sender.join(timeout=120)
    assert finished == [("health", 200), ("short", 200), ("long", 400)]


@pytest.mark.parametrize(("path", "body", "param", "code", "message"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 1500}]}, "messages",
     "context_length_exceeded", "do not fit max_model_len = 2048"),
    ("/v1/completions", {"prompt": [[5, 6], list(range(3, 300)) * 7]}, "prompt[1]", "context_length_exceeded",
     "2079 tokens do not fit"),
    ("/v1/completions", {"prompt": [5, 320]}, "prompt", "invalid_value", "token id 320 is outside the vocabulary"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 9}, "n", "invalid_value",
     r"SamplingParams.n = 9: must be <= max_num_seqs \(8\)"),
])
def test_engine_refusals_reach_the_client(server, path, body, param, code, message):
    """The engine's typed errors arrive as 400s with their param (renamed to the request's field) and code."""
    response = httpx.post(server.base + path, json={"model": MODEL, "max_tokens": 4, **body},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert re.search(message, error["message"]), error["message"]


def test_engine_errors_are_typed_value_errors(engine):
    with pytest.raises(EngineError) as too_long:
        engine.encode(list(range(3, 300)) * 7)
    assert (too_long.value.param, too_long.value.code) == ("prompt", "context_length_exceeded")
    with pytest.raises(ValueError) as bad_value:  # callers that catch ValueError still do
        SamplingParams(top_p=1.5)
    assert isinstance(bad_value.value, EngineError)
    assert (bad_value.value.param, bad_value.value.code) == ("top_p", "invalid_value")


def test_cancelled_stream_frees_its_slot(server):
    aborted = server.metric("nanoseek_requests_aborted_total")
    with httpx.stream("POST", server.base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": "hello", "max_tokens": 200, "stream": True,
                            "temperature": 1.0}) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: "):
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.metric("nanoseek_requests_aborted_total") == aborted + 1 and \
                server.metric("nanoseek_cache_slots_used") == 0:
            break
        time.sleep(0.05)
    assert server.metric("nanoseek_requests_aborted_total") == aborted + 1
    assert server.metric("nanoseek_cache_slots_used") == 0


def test_non_streaming_request_is_cancelled_when_its_client_leaves(server):
    aborted = server.metric("nanoseek_requests_aborted_total")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5,
                   json={"model": MODEL, "prompt": "hello", "max_tokens": 2000, "ignore_eos": True, "n": 4})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.metric("nanoseek_requests_aborted_total") == aborted:
        time.sleep(0.05)
    assert server.metric("nanoseek_requests_aborted_total") == aborted + 1
    assert server.metric("nanoseek_cache_slots_used") == 0


# ---- load ------------------------------------------------------------------------------------------------
def test_32_concurrent_streaming_clients(server):
    client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=KEY)

    async def user(u: int) -> list[str]:
        finishes = []
        for r in range(4):
            messages = [{"role": "user", "content": f"{u} {r}"}]
            stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True,
                                                          seed=u * 4 + r)
            chunks = [c async for c in stream]
            assert chunks[0].choices[0].delta.role == "assistant"
            finishes += [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
        return finishes

    async def everyone():
        return await asyncio.gather(*(user(u) for u in range(32)))

    results = asyncio.run(everyone())
    assert all(len(finishes) == 4 and set(finishes) <= {"stop", "length"} for finishes in results)
    assert server.metric("nanoseek_num_requests_running") == 0


@contextmanager
def busy_stream(server: Server):
    """A long streaming completion that holds one sequence of the running batch while the block runs."""
    with httpx.stream("POST", server.base + "/v1/completions",
                      json={"model": MODEL, "prompt": "hi", "max_tokens": 2000, "stream": True,
                            "ignore_eos": True}) as busy:
        lines = busy.iter_lines()  # held: a dropped iterator closes the stream, which cancels the request
        assert busy.status_code == 200, next(lines)
        yield


def test_queue_full_is_429(checkpoint):
    small = Server(checkpoint, "--max-num-seqs", "1", "--max-queue", "0", "--max-model-len", "2048")
    try:
        client = small.client(max_retries=0)
        with busy_stream(small):
            with pytest.raises(openai.RateLimitError) as refused:
                client.completions.create(model=MODEL, prompt="hello", max_tokens=2)
            assert refused.value.response.headers["retry-after"] == "1"
        assert small.metric("nanoseek_requests_rejected_total") == 1
    finally:
        small.stop()


@pytest.fixture(scope="module")
def small(checkpoint):
    """Room for two sequences, one running, one queued; streams ping after 0.1 s without an event."""
    small = Server(checkpoint, "--max-num-seqs", "1", "--max-queue", "1", "--max-model-len", "2048",
                   "--sse-ping-interval", "0.1")
    yield small
    small.stop()


def idle(server: Server) -> None:
    for _ in range(100):  # a closed stream's request leaves the batch
        if server.metric("nanoseek_num_requests_running") == 0:
            return
        time.sleep(0.05)


def test_a_refused_multi_prompt_request_holds_no_capacity(small):
    """With one stream running, a request of two prompts gets the second refused (429); the first, already
    queued, must be released, or the server stays full after the stream ends."""
    client = small.client(max_retries=0)
    with busy_stream(small):
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt=["hello", "there"], max_tokens=2)
    idle(small)
    both = client.completions.create(model=MODEL, prompt=["hello", "there"], max_tokens=2)
    assert len(both.choices) == 2


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_queued_stream_sends_keep_alive_comments(small, path):
    """A stream waiting behind a full batch sends SSE comments (which clients skip) until its turn comes."""
    body = {"model": MODEL, "max_tokens": 3, "stream": True, **(
        {"messages": MESSAGES} if "chat" in path else {"prompt": "hello"})}
    client, chunks = small.client(max_retries=0), []

    def through_the_sdk() -> None:  # the openai client reads past the comments
        create = client.chat.completions.create if "chat" in path else client.completions.create
        chunks.extend(create(**body))

    with busy_stream(small):
        with httpx.stream("POST", small.base + path, json=body, timeout=30) as queued:
            assert ": keep-alive" in itertools.islice(queued.iter_lines(), 8)
        sdk_stream = threading.Thread(target=through_the_sdk)
        sdk_stream.start()
        time.sleep(0.5)
    sdk_stream.join(timeout=60)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


def test_deepseek_r1_rules(checkpoint):
    r1 = Server(checkpoint, "--compat", "deepseek-r1", "--max-model-len", "256")
    try:
        client = r1.client(max_retries=0)
        with pytest.raises(openai.BadRequestError) as rejected:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True)
        assert rejected.value.body["param"] == "logprobs"
        history = [*MESSAGES, {"role": "assistant", "content": "5", "reasoning_content": "2 + 3 = 5"},
                   {"role": "user", "content": "and 3 + 4?"}]
        with pytest.raises(openai.BadRequestError) as echoed:
            client.chat.completions.create(model=MODEL, messages=history)
        assert echoed.value.body["param"] == "messages[1].reasoning_content"
        cold, hot = (client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, seed=4,
                                                    temperature=t).choices[0].message for t in (0.0, 2.0))
        assert cold == hot  # ignored: R1's own 0.6 / 0.95 apply
    finally:
        r1.stop()


# ---- the OpenAPI schema, fuzzed ----------------------------------------------------------------------------
def test_fuzzed_requests_never_get_5xx(server):
    """schemathesis generates requests from the server's own OpenAPI schema; none may get a 5xx."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", server.base + "/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "40", "--request-timeout", "60",
         "--header", f"Authorization: Bearer {KEY}", "--seed", "1"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"\d+ generated, (\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 100, result.stdout[-2000:]  # the fuzzer did send requests


# ---- the chat page in a real browser -------------------------------------------------------------------------
def test_chat_page_in_chromium(server):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed and could not be (make test installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(server.base + "/")
            page.fill("#key", KEY)
            page.fill("#prompt", "What is 2 + 3?")
            page.click("#send")
            page.wait_for_function("document.querySelector('.assistant') && "
                                   "document.querySelector('.assistant').innerText.trim().length > 0", timeout=30000)
            page.wait_for_function("!document.querySelector('#send').disabled", timeout=30000)
            assert page.inner_text(".user") == "What is 2 + 3?"
            assert re.search(r"\S", page.inner_text(".assistant"))
        finally:
            browser.close()
