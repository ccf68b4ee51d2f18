"""Request bodies of the OpenAI-compatible API (OpenAI's API reference: chat and legacy completions),
checked by pydantic.

Unknown fields are accepted and ignored (SDKs send vendor extras through `extra_body`); values out of
range fail with a 400 whose `param` names the field. Responses are plain dicts built by the handlers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOPS = 16  # DeepSeek's API limit on `stop`


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.kind = kind or {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                             503: "service_unavailable"}.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class BadText(ValueError):
    """A string in the request that is not text: a lone UTF-16 surrogate (JSON allows "\\ud800", Unicode does
    not) or NUL. `param` is its place in the body, as "messages.0.content"."""

    def __init__(self, param: str, problem: str):
        super().__init__(f"{param}: {problem}")
        self.param = param


def check_text(value: Any, path: str = "") -> None:
    """Raise BadText for the first string in `value` (JSON: dicts, lists, strings; keys too) that is not text."""
    if isinstance(value, str):
        if "\x00" in value:
            raise BadText(path or "body", "contains NUL (U+0000)")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadText(path or "body", f"a lone surrogate (U+{ord(value[exc.start]):04X}) is not text; "
                          "send a character outside the BMP as a surrogate pair") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            key_text = str(key).encode("utf-8", "backslashreplace").decode()  # the path is in the error's JSON
            place = f"{path}.{key_text}" if path else key_text
            check_text(key, place)
            check_text(item, place)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_text(item, f"{path}.{i}" if path else str(i))


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(Open):
    type: Literal["text"]
    text: str


class Message(Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # the name vLLM and Ollama use
    prefix: bool = False  # DeepSeek's chat prefix completion (beta): the reply continues this last message
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls, as the API returned them
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(Open):
    include_usage: bool | None = False


class JSONSchemaFormat(Open):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # `schema` would shadow BaseModel.schema
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


Stop = str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
Seed = Annotated[int, Field(ge=-(2**63), lt=2**63)]


class Body(Open):
    """A request body: every string in it is text (`check_text`), before the tokenizer, the template or a
    response's echo meets it."""

    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, data: Any) -> Any:
        check_text(data)
        return data


class SamplingFields(Body):
    """Fields chat and completions share (OpenAI's, with vLLM's extras top_k, min_p, repetition_penalty)."""

    model: str
    n: Annotated[int, Field(ge=1, le=64)] = 1
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stop: Stop = None
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = False  # vLLM's extra: generate to max_tokens (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, value: Stop) -> Stop:
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value


class ChatRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    thinking: dict[str, Any] | None = None  # DeepSeek V3.1+: {"type": "enabled" | "disabled"}
    reasoning_effort: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] | \
        Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0: with echo, only the prompt (scored)
    suffix: str | None = None
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None


class TokenizeRequest(Body):
    """POST /tokenize (vLLM's): a text `prompt`, or chat `messages` rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_special_tokens: bool = True  # for `prompt`: the tokenizer's BOS
    add_generation_prompt: bool = True  # for `messages`: the template's opening of the reply


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]
