"""Tool calls through a live server and the official openai client: forced calls are schema-valid whatever the
weights, results continue the conversation, streamed fragments reassemble, in Hermes's syntax (nanoseek's own
tokenizer) and in DeepSeek-V3's (its special tokens)."""

from __future__ import annotations

import json

import httpx
import jsonschema_rs
import pytest
from conftest import nanoseek_model
from test_serve import KEY, MODEL, Server, write_checkpoint
from tokenizers import AddedToken

from nanoseek.serve.tools import DEEPSEEK, HERMES, ToolStream
from nanoseek.tokenizer import Tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast for a city",
                                           "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
             "required": ["a", "b"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
DEEP: dict = {"type": "string"}
for _ in range(400):  # nested past what a recursive check of it could take
    DEEP = {"anyOf": [DEEP]}
DIRECT = {"thinking": {"type": "disabled"}}  # no think block first: random weights might never close it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(write_checkpoint(tmp_path_factory.mktemp("tools") / "tiny"), "--api-key", KEY,
                    "--max-num-seqs", "8", "--max-model-len", "2048")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def deepseek_server(tmp_path_factory):
    """The same weights with DeepSeek-V3's tool-call tokens in the vocabulary (special, as in its tokenizer)."""
    path = write_checkpoint(tmp_path_factory.mktemp("tools") / "deepseek")
    tokenizer = Tokenizer.from_dir(path)
    markers = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
               "<｜tool▁sep｜>"]
    tokenizer.backend.add_tokens([AddedToken(t, special=True) for t in markers])
    tokenizer.save(path)
    nanoseek_model(seed=3, vocab_size=tokenizer.vocab_size, max_position_embeddings=4096).save_pretrained(path)
    server = Server(path, "--api-key", KEY, "--max-num-seqs", "8", "--max-model-len", "2048")
    yield server
    server.stop()


def arguments_valid(arguments: str, schema: dict) -> bool:
    try:
        jsonschema_rs.validate(schema, json.loads(arguments))
    except (ValueError, jsonschema_rs.ValidationError):
        return False
    return True


@pytest.mark.parametrize("family", ["hermes", "deepseek"])
def test_required_calls_are_schema_valid_and_results_continue_the_conversation(server, deepseek_server, family):
    client = (server if family == "hermes" else deepseek_server).client(max_retries=0)
    for seed in range(4):
        reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                               max_tokens=150, temperature=1.0, seed=seed, extra_body=DIRECT)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        for call in choice.message.tool_calls:
            schema = WEATHER if call.function.name == "get_weather" else TOOLS[1]["function"]["parameters"]
            assert call.id.startswith("call_") and arguments_valid(call.function.arguments, schema), call
    result = {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "sunny and 21 degrees"}
    history = [*ASK, choice.message.model_dump(exclude_none=True), result]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8, temperature=0,
                                            extra_body=DIRECT)
    without = client.chat.completions.create(model=MODEL, messages=history[:2], tools=TOOLS, max_tokens=8,
                                             temperature=0, extra_body=DIRECT)
    assert answer.usage.prompt_tokens > without.usage.prompt_tokens + 5  # the result is in the prompt
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    served = server if family == "hermes" else deepseek_server
    assert served.metric("nanoseek_constrained_requests_total") >= 4
    assert served.metric("nanoseek_tool_calls_parsed_total") >= 4
    assert served.metric("nanoseek_grammar_mask_seconds_count") > 0


def test_a_forced_call_after_r1_reasoning_keeps_the_reasoning(server):
    """The R1 template opens a think block: the reply reasons first (in reasoning_content), for at most half
    its tokens, then </think> is forced and the call follows, valid whatever the weights."""
    reply = server.client(max_retries=0).chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=300, temperature=1.0, seed=11)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.reasoning_content) > 0
    assert arguments_valid(choice.message.tool_calls[0].function.arguments, WEATHER)
    assert reply.usage.completion_tokens_details.reasoning_tokens <= 150 + 1


def test_a_named_function_is_the_one_called_and_streamed_fragments_reassemble(server):
    client = server.client(max_retries=0)
    named = {"type": "function", "function": {"name": "add"}}
    request = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=150, temperature=1.0,
                   seed=7, extra_body=DIRECT)
    whole = client.chat.completions.create(**request).choices[0].message.tool_calls
    assert [c.function.name for c in whole] == ["add"]
    calls: dict[int, dict] = {}
    finishes, pieces = [], 0
    for chunk in client.chat.completions.create(**request, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
            pieces += bool(delta.function.arguments)
        finishes += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert calls == {0: {"name": "add", "arguments": whole[0].function.arguments}} and finishes == ["tool_calls"]
    assert pieces > 2  # the arguments arrive as they are written, not in one piece at the end


@pytest.mark.parametrize("syntax", [HERMES, DEEPSEEK], ids=["hermes", "deepseek"])
def test_calls_parse_back_whole_and_streamed_a_character_at_a_time(syntax):
    calls = [("get_weather", '{"city": "Paris", "days": 2}'), ("add", '{"a": {"nested": [1, "}"]}}')]
    text = "Let me look. " + syntax.render(calls)
    assert syntax.parse(text) == ("Let me look. ", calls)
    assert syntax.parse("no call here") is None and syntax.parse(syntax.opener + "garbage") is None
    nested = syntax.render([("a", "{}")])  # a call's head inside another's arguments is text, whole and streamed
    inner = syntax.render([("outer", '{"x": ' + json.dumps(nested) + "}")])
    assert [n for n, _ in syntax.parse(inner)[1]] == ["outer"]
    if syntax is HERMES:  # a name that is not a JSON string: no call, whole or streamed
        bad = '<tool_call>\n{"name": "a\\u12", "arguments": {}}\n</tool_call>'
        assert syntax.parse(bad) is None
        broken = ToolStream(syntax, parallel=True)
        assert broken.feed(bad)[1] == [] and broken.finish() == bad
        surrogate = '<tool_call>\n{"name": "\\ud83d", "arguments": {}}\n</tool_call>'
        assert syntax.parse(surrogate) is None
    stream, content, fragments = ToolStream(syntax, parallel=True), "", []
    for character in text:
        plain, new = stream.feed(character)
        content, fragments = content + plain, fragments + new
    content += stream.finish()
    names = [f["function"]["name"] for f in fragments if "id" in f]
    arguments = ["".join(f["function"]["arguments"] for f in fragments if f["index"] == i) for i in range(2)]
    assert content == "Let me look. " and names == ["get_weather", "add"] and arguments == [a for _, a in calls]
    held = ToolStream(syntax, parallel=True)
    assert held.feed(syntax.opener[:4]) == ("", [])  # a possible start of a call waits
    assert held.feed(" text")[0] + held.finish() == syntax.opener[:4] + " text"  # and goes out when it is not


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]},
     "messages[1].tool_calls[0]"),
    ({"tools": [{"type": "function", "function": {"name": "deep", "strict": True, "parameters": DEEP}}]},
     "tools.0.function.parameters"),
])
def test_bad_tool_requests_are_400(server, body, param):
    response = httpx.post(server.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": MODEL, "messages": ASK, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_tool_choice_none_offers_no_tools(server):
    client = server.client()
    offered = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=2)
    declined = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=2)
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    assert declined.usage.prompt_tokens == plain.usage.prompt_tokens < offered.usage.prompt_tokens


def test_a_template_that_renders_calls_but_not_results_gets_results_as_user_text(tmp_path):
    """An early DeepSeek-V3 template renders assistant tool_calls and has no 'tool' role: results go in a user
    message's <tool_response> block rather than vanish; the calls are the template's to render."""
    from nanoseek.engine import LLM
    from nanoseek.serve.protocol import ChatRequest
    from nanoseek.serve.server import Server as AppServer
    from nanoseek.serve.server import ServerConfig

    path = write_checkpoint(tmp_path / "early")
    tokenizer = Tokenizer.from_dir(path)
    tokenizer.config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}{% elif m['role'] == "
        "'assistant' %}<|assistant|>{% for c in m.get('tool_calls', []) %}[call {{ c['function']['name'] }} "
        "{{ c['function']['arguments'] }}]{% endfor %}{{ m['content'] }}{% endif %}{% endfor %}<|assistant|>")
    tokenizer.save(path)
    server = AppServer(LLM(path, max_model_len=512), ServerConfig(MODEL))
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    body = ChatRequest(model=MODEL, messages=[*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                                              {"role": "tool", "tool_call_id": "call_1", "content": "rain"}])
    ids, _ = server.chat_prompt(body)
    text = server.tokenizer.decode(ids, skip_special_tokens=False)
    assert '[call get_weather {"city": "Oslo"}]' in text and "<tool_response>\nrain\n</tool_response>" in text
