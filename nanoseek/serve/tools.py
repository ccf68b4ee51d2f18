"""Tool calls (OpenAI's function calling): the tools in the prompt, the call syntax of the model's family, the
grammar that makes a reply a valid call, and the parser that reads calls back out of a reply or a stream.

Two families of call syntax, chosen by the vocabulary:
* DeepSeek-V3's (its chat template): `<｜tool▁calls▁begin｜>` then, per call, `<｜tool▁call▁begin｜>function
  <｜tool▁sep｜>NAME` + "\\n```json\\n" + ARGUMENTS + "\\n```<｜tool▁call▁end｜>", calls apart by "\\n", then
  `<｜tool▁calls▁end｜>`;
* Hermes's, which Qwen2.5 and most dense families use: per call `<tool_call>\\n{"name": NAME, "arguments":
  ARGUMENTS}\\n</tool_call>`, calls apart by "\\n".
A template that renders `tools` itself gets them; otherwise a system message lists them with the syntax.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..r1 import partial_tag_length
from ..tokenizer import Tokenizer
from .protocol import APIError


@dataclass(frozen=True)
class CallSyntax:
    block_open: str  # before the first call ("" if none)
    call_open: str  # before a call's name
    name_quoted: bool  # the name as a JSON string (Hermes) or bare (DeepSeek)
    between: str  # between name and arguments
    call_close: str  # after a call's arguments
    separator: str  # between two calls
    block_close: str  # after the last call

    @property
    def opener(self) -> str:
        """What starts the first call: where a reply's content ends."""
        return self.block_open or self.call_open

    def render(self, calls: list[tuple[str, str]]) -> str:
        """calls (name, arguments as JSON text) as the model writes them."""
        parts = [f"{self.call_open}{json.dumps(n) if self.name_quoted else n}{self.between}{a}{self.call_close}"
                 for n, a in calls]
        return self.block_open + self.separator.join(parts) + self.block_close

    def head(self) -> re.Pattern:
        """A call's start up to its arguments; group 1 is the name (a JSON string's inside for Hermes)."""
        # bounded, on one line: an unclosed name is not re-scanned to the end of a long reply at every token
        name = r'"((?:[^"\\\n]|\\.){1,256})"' if self.name_quoted else r"([^\s<]{1,256}?)"
        return re.compile(re.escape(self.call_open) + name + re.escape(self.between))

    def called(self, match: re.Match) -> str | None:
        """The name a head match calls; None if it is not a name (a bad JSON string)."""
        try:
            name = json.loads(f'"{match.group(1)}"') if self.name_quoted else match.group(1)
            name.encode("utf-8")  # a lone surrogate ("\ud83d") is no name, and no JSON response could hold it
        except (json.JSONDecodeError, UnicodeEncodeError):
            return None
        return name

    def parse(self, text: str) -> tuple[str, list[tuple[str, str]]] | None:
        """(content before the calls, [(name, arguments as written)]) when `text` holds complete calls; else
        None. The arguments are not checked: without a grammar a model may write bad JSON, which OpenAI's
        API returns as it is too, and a stream has sent them before they end."""
        at = text.find(self.opener)
        if at < 0:
            return None
        calls, head, position = [], self.head(), at
        while (match := head.search(text, position)) is not None:
            close, name = text.find(self.call_close, match.end()), self.called(match)
            if close < 0 or name is None:
                break
            calls.append((name, text[match.end(): close]))
            position = close + len(self.call_close)  # the next call starts after this one's end
        return (text[:at], calls) if calls else None


DEEPSEEK = CallSyntax("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>function<｜tool▁sep｜>", False,
                      "\n```json\n", "\n```<｜tool▁call▁end｜>", "\n", "<｜tool▁calls▁end｜>")
HERMES = CallSyntax("", '<tool_call>\n{"name": ', True, ', "arguments": ', "}\n</tool_call>", "\n", "")


def call_syntax(tokenizer: Tokenizer) -> CallSyntax:
    return DEEPSEEK if tokenizer.token_id(DEEPSEEK.block_open) is not None else HERMES


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]
    strict: bool


def functions(tools: list[dict[str, Any]] | None) -> list[Function]:
    """The request's `tools`, checked: each {"type": "function", "function": {"name", "parameters", ...}}."""
    found = []
    for i, tool in enumerate(tools or []):
        spec = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(spec, dict):
            raise APIError(400, f"tools.{i}: must be {{'type': 'function', 'function': {{...}}}}", f"tools.{i}")
        name = spec.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise APIError(400, f"tools.{i}.function.name: 1 to 64 letters, digits, _ . or -",
                           f"tools.{i}.function.name")
        parameters = spec.get("parameters", {"type": "object", "properties": {}, "additionalProperties": False})
        if not isinstance(parameters, dict):
            raise APIError(400, f"tools.{i}.function.parameters: must be a JSON schema object",
                           f"tools.{i}.function.parameters")
        strict = spec.get("strict") is True
        problem = strict_violation(parameters) if strict else None
        if problem:  # DeepSeek's strict mode (beta) and OpenAI's refuse such a schema too
            raise APIError(400, f"tools.{i}.function.parameters{problem}", f"tools.{i}.function.parameters")
        found.append(Function(name, str(spec.get("description", "")), parameters, strict))
    if len({f.name for f in found}) != len(found):
        raise APIError(400, "tools: function names must be unique", "tools")
    return found


def strict_violation(schema: Any) -> str | None:
    """Where `schema` breaks strict mode, as '.properties.x: why'; None if it keeps it."""
    try:
        return _strict_violation(schema)
    except RecursionError:
        return ": nested too deeply"


def _strict_violation(schema: Any, path: str = "") -> str | None:
    """Where `schema` breaks strict mode, as '.properties.x: why'; None if it keeps it. Strict: every object
    lists all its properties as required and sets additionalProperties false (OpenAI's structured outputs;
    DeepSeek's strict function calling)."""
    if isinstance(schema, list):
        return next((p for i, item in enumerate(schema) if (p := _strict_violation(item, f"{path}.{i}"))), None)
    if not isinstance(schema, dict):
        return None
    for key in ("properties", "$defs", "definitions"):
        if not isinstance(schema.get(key, {}), dict):
            return f"{path}.{key}: must be an object"
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        return f"{path}.required: must be a list of property names"
    if schema.get("type") == "object" or "properties" in schema:
        if schema.get("additionalProperties") is not False:
            return f"{path}: strict mode needs additionalProperties: false on every object"
        missing = sorted(set(schema.get("properties", {})) - set(required))
        if missing:
            return f"{path}: strict mode needs every property required; not required: {', '.join(missing)}"
    for key in ("properties", "$defs", "definitions"):
        for name, sub in schema.get(key, {}).items():
            if (problem := _strict_violation(sub, f"{path}.{key}.{name}")):
                return problem
    for key in ("items", "anyOf", "allOf", "oneOf"):
        if key in schema and (problem := _strict_violation(schema[key], f"{path}.{key}")):
            return problem
    return None


def calls_grammar(syntax: CallSyntax, chosen: list[Function], parallel: bool, tokenizer: Tokenizer,
                  opened: bool = False) -> str:
    """A Lark grammar (llguidance's dialect) of one call, or several when `parallel`, to one of `chosen`, with
    arguments matching its parameters' schema; `opened`: from after the block's opening (the model wrote it).
    Special tokens are named by id, as llguidance matches them."""
    def literal(text: str) -> str:
        parts = re.split(r"(<｜[^｜]*｜>)", text)
        pieces = [f"<[{tokenizer.token_id(p)}]>" if p.startswith("<｜") else json.dumps(p) for p in parts if p]
        return " ".join(pieces)

    more = f"({literal(syntax.separator)} call)*" if parallel else ""
    start = "" if opened else literal(syntax.block_open)
    rules = [f"start: {start} call {more} {literal(syntax.block_close)}",
             "call: " + " | ".join(f"call_{i}" for i in range(len(chosen)))]
    for i, function in enumerate(chosen):
        shown = json.dumps(function.name) if syntax.name_quoted else function.name
        schema = {**function.parameters, "x-guidance": {"whitespace_flexible": False}}
        rules.append(f"call_{i}: {literal(syntax.call_open + shown + syntax.between)} args_{i} "
                     f"{literal(syntax.call_close)}")
        rules.append(f"args_{i}: %json {json.dumps(schema)}")
    return "\n".join(rules) + "\n"


def tools_prompt(syntax: CallSyntax, available: list[Function]) -> str:
    """The system message that lists the tools for a template that does not render them."""
    listed = "\n".join(json.dumps({"name": f.name, "description": f.description, "parameters": f.parameters})
                       for f in available)
    example = syntax.render([("NAME", '{"ARGUMENT": "VALUE"}')])
    return (f"You may call these tools, one JSON schema per line:\n{listed}\nTo call one, reply with exactly "
            f"{example}")


def openai_calls(calls: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": n, "arguments": a}}
            for n, a in calls]


class ToolStream:
    """A streamed reply's content split into text and tool calls, as OpenAI streams them: text passes until
    the call syntax opens (a possible start of it is held back); each call then goes out as `delta.tool_calls`
    fragments, first its id, type and name, then its arguments piece by piece as they are written (a possible
    start of the call's closing held back); text that never opens a call ends as text."""

    def __init__(self, syntax: CallSyntax, parallel: bool):
        self.syntax, self.parallel, self.pattern = syntax, parallel, syntax.head()
        self.buffer, self.calling, self.position = "", False, 0
        self.sent = 0  # calls complete
        self.open: tuple[int, int] | None = None  # the call being written: (its index, arguments sent up to)

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(content to send now, tool-call fragments to send now)."""
        self.buffer += text
        if not self.calling:
            at = self.buffer.find(self.syntax.opener)
            if at < 0:
                keep = partial_tag_length(self.buffer, self.syntax.opener)
                out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                return out, []
            out, self.buffer, self.calling = self.buffer[:at], self.buffer[at:], True
            return out, self._fragments()
        return "", self._fragments()

    def _fragments(self) -> list[dict[str, Any]]:
        fragments: list[dict[str, Any]] = []
        while True:
            if self.open is None:
                if self.sent and not self.parallel:
                    break  # one call only: the rest is dropped
                match = self.pattern.search(self.buffer, self.position)
                name = None if match is None else self.syntax.called(match)
                if name is None:
                    if match is None:  # the next search starts where a call could still begin
                        found = self.buffer.find(self.syntax.call_open, self.position)
                        self.position = found if found >= 0 else max(
                            self.position, len(self.buffer) - len(self.syntax.call_open) + 1)
                    break
                call = openai_calls([(name, "")])[0]
                fragments.append({"index": self.sent, **call})
                self.open = (self.sent, match.end())
            index, sent = self.open
            close = self.buffer.find(self.syntax.call_close, sent)
            end = close if close >= 0 else len(self.buffer) - partial_tag_length(self.buffer, self.syntax.call_close)
            if end > sent:
                fragments.append({"index": index, "function": {"arguments": self.buffer[sent:end]}})
            self.open = (index, max(end, sent))
            if close < 0:
                break
            self.position, self.open, self.sent = close + len(self.syntax.call_close), None, self.sent + 1
        return fragments

    def finish(self) -> str:
        """Text held back that never became a call."""
        started = self.sent or self.open is not None
        rest, self.buffer = ("" if started else self.buffer), ""
        return rest

