"""The server's state and the work both handlers share with it: the conversation as a prompt, a request's
checks and sampling parameters, usage, and log-probabilities in the API's two shapes.

The engine's own refusals (`EngineError`) become 400s in one place, `engine_refusals`.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..engine import LLM, CompletionOutput, EngineError, SamplingParams
from ..engine.structured import StructuredOutput
from ..r1 import THINK_CLOSE, opens_think
from . import COMPAT_MODES
from .bridge import AsyncEngine
from .protocol import APIError, ChatRequest, Message, SamplingFields
from .tools import Function, call_syntax, tools_prompt

R1_SAMPLING = {"temperature": 0.6, "top_p": 0.95}  # DeepSeek-R1 model card's recommendation


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    compat: str = "openai"
    max_queue: int = 256
    max_request_bytes: int = 8 * 2**20  # a larger body gets 413 before it is parsed
    sse_ping_interval: float = 15.0  # seconds without an event before a stream sends a keep-alive comment


@contextmanager
def engine_refusals(prompt_param: str = "prompt", structured_param: str = "response_format") -> Iterator[None]:
    """Answer an EngineError raised inside as a 400 with its `param` and `code`. The engine calls any prompt
    `prompt`; `prompt_param` is the request field this one came from (`messages`, `prompt[2]`), and
    `structured_param` the field the grammar came from (`response_format`, `tools`)."""
    try:
        yield
    except EngineError as exc:
        param = {"prompt": prompt_param, "structured": structured_param}.get(exc.param, exc.param)
        raise APIError(400, exc.message, param, exc.code) from exc


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
        if self.think_close_id is not None and self.think_close_id >= llm.model.config.vocab_size:
            self.think_close_id = None  # a token the model cannot write
        self.call_syntax = call_syntax(self.tokenizer)
        template = self.tokenizer.chat_template
        source = template if isinstance(template, str) else json.dumps(template)
        # what the template renders itself (DeepSeek-V3's renders calls and results, not the list of tools; an
        # early version of it has no 'tool' role, and would drop results)
        self.template_lists_tools, self.template_renders_calls = "tools" in source, "tool_calls" in source
        self.template_renders_results = re.search(r"""['"]tool['"]""", source) is not None
        # the tokens decoding leaves out of text (skip_special_tokens): they take no room in a text offset
        self.special_ids = {i for i, t in self.tokenizer.backend.get_added_tokens_decoder().items() if t.special}
        identity = json.dumps([model_path, llm.model.config.to_dict(), str(llm.model.dtype),
                               llm.model.weight_format, llm.max_model_len, config.compat], sort_keys=True, default=str)
        self.fingerprint = "fp_" + hashlib.blake2b(identity.encode(), digest_size=6).hexdigest()

    def response_meta(self, id_prefix: str) -> dict[str, Any]:
        """The fields every response and stream chunk of one request repeats."""
        return {"id": f"{id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.config.served_model_name, "system_fingerprint": self.fingerprint}

    # ---- prompts ------------------------------------------------------------------------------
    def chat_prompt(self, body: ChatRequest, add_generation_prompt: bool = True,
                    tools: list[Function] | None = None) -> tuple[list[int], bool]:
        """Token ids of the conversation, and whether the prompt leaves the model inside a think block.

        DeepSeek's chat prefix completion (`prefix: true` on a last assistant message): the reply continues
        that message's content. Where the template opens a think block, the prefix is the answer, so the block
        is closed first, holding the message's `reasoning_content` if it has one; a prefix of reasoning alone
        (empty content) leaves the block open and the reply continues the reasoning. `tools`: the functions the
        reply may call, rendered by the template if it knows tools, else listed in a system message."""
        if not self.tokenizer.chat_template:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        messages, prefix = self._template_messages(body)
        extra = {}
        if tools and self.template_lists_tools:
            extra["tools"] = [{"type": "function", "function": {"name": f.name, "description": f.description,
                                                                "parameters": f.parameters}} for f in tools]
        elif tools:
            system = tools_prompt(self.call_syntax, tools)
            if messages and messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + system}
            else:
                messages.insert(0, {"role": "system", "content": system})
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      **extra)
        except ValueError as exc:  # the template's raise_exception: the conversation breaks its rules
            raise APIError(400, f"messages: {exc}", "messages") from exc
        in_reasoning = opens_think(text)
        reasoning = None if prefix is None else (prefix.reasoning_content or prefix.reasoning)
        answer = "" if prefix is None else prefix.text()
        if in_reasoning and reasoning and not answer:
            text += reasoning
        elif in_reasoning and ((body.thinking or {}).get("type") == "disabled" or prefix is not None):
            text, in_reasoning = text + (f"{reasoning}\n" if reasoning else "") + THINK_CLOSE + "\n", False
        ids = self.tokenizer.encode(text + answer, add_special_tokens=False)
        return ids, in_reasoning

    def _template_messages(self, body: ChatRequest) -> tuple[list[dict[str, Any]], Message | None]:
        """The messages the chat template renders, and the prefix message (DeepSeek's beta) if the last is one.
        Earlier replies' reasoning never enters the prompt."""
        messages, prefix = [], None
        for i, message in enumerate(body.messages):
            is_prefix = message.role == "assistant" and message.prefix
            if is_prefix and i != len(body.messages) - 1:
                raise APIError(400, f"messages[{i}].prefix: only the last message may be a prefix",
                               f"messages[{i}].prefix")
            if (message.reasoning_content or message.reasoning) and self.config.compat == "deepseek-r1" \
                    and not is_prefix:
                raise APIError(400, f"messages[{i}].reasoning_content: remove the reasoning from earlier replies "
                               "before sending them back (DeepSeek-R1's rule)", f"messages[{i}].reasoning_content")
            if is_prefix:
                prefix = message
                continue
            messages.append(self._template_message(message, i))
        return messages, prefix

    def _template_message(self, message: Message, i: int) -> dict[str, Any]:
        """One message as the template takes it. A template that renders calls gets calls and results in
        OpenAI's shape; any other sees the calls written in the model's call syntax and each result as a user
        message in a <tool_response> block (Hermes's convention)."""
        role = "system" if message.role == "developer" else message.role
        if message.tool_calls and role == "assistant":
            calls = _message_calls(message.tool_calls, i)
            if self.template_renders_calls:
                return {"role": role, "content": message.text(), "tool_calls": [
                    {"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}
            return {"role": role, "content": message.text() + self.call_syntax.render(calls)}
        if role == "tool":
            if self.template_renders_results:
                return {"role": "tool", "content": message.text(), "tool_call_id": message.tool_call_id}
            return {"role": "user", "content": f"<tool_response>\n{message.text()}\n</tool_response>"}
        return {"role": role, "content": message.text()}

    def check_prompt(self, ids: list[int], param: str) -> None:
        """The engine's prompt checks (non-empty, in the vocabulary, fits the context), with `param` the
        request field the prompt came from."""
        with engine_refusals(param):
            self.llm.encode(ids)

    # ---- sampling -----------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                           f"{self.config.served_model_name!r}", "model", "model_not_found")

    def reply_limit(self, ids: list[int], max_tokens: int | None) -> int:
        """The most tokens a reply to `ids` gets: the request's cap, else the checkpoint's default, within the
        room the context leaves."""
        room = self.llm.max_model_len - len(ids)
        return min(max_tokens or self.llm.sampling_defaults.get("max_tokens") or room, room)

    def sampling(self, body: SamplingFields, ids: list[int], max_tokens: int | None, logprobs: int | None,
                 reasoner_rules: bool = False, prompt_logprobs: int | None = None,
                 structured: StructuredOutput | None = None, keep_special: bool = False,
                 structured_param: str = "response_format") -> SamplingParams:
        """The engine's parameters for a checked prompt `ids`, refused here if the engine would refuse them."""
        self.check_model(body.model)
        ignored = reasoner_rules and self.config.compat == "deepseek-r1"
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        default = {**SamplingParams().__dict__, **self.llm.sampling_defaults}  # generation_config.json's first
        with engine_refusals(structured_param=structured_param):
            params = SamplingParams(
                n=body.n, max_tokens=self.reply_limit(ids, max_tokens),
                temperature=R1_SAMPLING["temperature"] if ignored else _default(body.temperature,
                                                                                default["temperature"]),
                top_p=R1_SAMPLING["top_p"] if ignored else _default(body.top_p, default["top_p"]),
                top_k=_default(body.top_k, default["top_k"]), min_p=_default(body.min_p, default["min_p"]),
                presence_penalty=0.0 if ignored else _default(body.presence_penalty, 0.0),
                frequency_penalty=0.0 if ignored else _default(body.frequency_penalty, 0.0),
                repetition_penalty=_default(body.repetition_penalty, default["repetition_penalty"]), stop=stop,
                seed=body.seed, logprobs=logprobs, ignore_eos=bool(body.ignore_eos), prompt_logprobs=prompt_logprobs,
                logit_bias=_logit_bias(body.logit_bias), structured=structured,
                skip_special_tokens=not keep_special)  # kept: DeepSeek's call syntax is special tokens
            self.llm.check(ids, params)  # what add_request checks on the engine thread, where it must not fail
        return params

    # ---- output helpers -----------------------------------------------------------------------
    def usage(self, prompt_len: int, outputs: list[CompletionOutput], cached: int, reasoning: int) -> dict[str, Any]:
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

    def completion_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float] | None], top: int,
                            offset: int) -> dict[str, Any]:
        """The legacy API's shape; an entry of None (a prompt's first token, which nothing predicts) is null.
        Offsets count characters of the decoded text: a character split over tokens counts once, at its first."""
        tokens, values, tops, offsets = [], [], [], []
        characters = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token, options in zip(token_ids, logprobs, strict=False):
            raw = self.tokenizer.token_bytes(token)
            tokens.append(raw.decode("utf-8", errors="replace"))
            values.append(None if options is None else _finite(options[token]))
            ranked = [] if options is None else sorted(options.items(), key=lambda item: -item[1])[:top]
            tops.append(None if options is None else {
                self.tokenizer.token_bytes(t).decode("utf-8", errors="replace"): _finite(lp) for t, lp in ranked})
            offsets.append(offset)
            offset += 0 if token in self.special_ids else len(characters.decode(raw))
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _message_calls(tool_calls: list[dict[str, Any]], i: int) -> list[tuple[str, str]]:
    """(name, arguments JSON) of an assistant message's `tool_calls`, checked."""
    calls = []
    for j, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
                not isinstance(function.get("arguments", ""), str):
            raise APIError(400, f"messages[{i}].tool_calls[{j}]: needs function.name and function.arguments "
                           "(a JSON string)", f"messages[{i}].tool_calls[{j}]")
        calls.append((function["name"], function.get("arguments", "") or "{}"))
    return calls


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias, keyed by token ids written as strings ({"50256": -100}); the engine checks the
    vocabulary."""
    if not bias:
        return None
    parsed = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise APIError(400, f"logit_bias.{key}: keys are token ids (integers >= 0 written as strings)",
                           f"logit_bias.{key}")
        parsed[int(key)] = value
    return parsed


def _default(value, default):
    return default if value is None else value


def _finite(value: float) -> float:
    return max(value, -9999.0)  # JSON has no -inf; OpenAI reports very unlikely tokens as -9999
