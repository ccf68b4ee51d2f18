"""Structured outputs: a grammar per sequence in the one sampler, whatever the weights (random here), for any
mix of constrained and free rows, with speculation too; and `response_format` through the server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import jsonschema_rs
import openai
import pytest
from conftest import nanoseek_model
from test_serve import KEY, MESSAGES, MODEL, Server, write_checkpoint

from nanoseek.engine import LLM, EngineError, SamplingParams
from nanoseek.engine.structured import StructuredOutput
from nanoseek.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "count": {"type": "integer", "minimum": -5, "maximum": 999},
    "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "count", "ok", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("structured") / "tiny")


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory, checkpoint) -> Path:
    path = tmp_path_factory.mktemp("structured") / "mtp"
    nanoseek_model(seed=4, vocab_size=320, max_position_embeddings=4096, num_nextn_predict_layers=1).save_pretrained(
        path)
    Tokenizer.from_dir(checkpoint).save(path)
    return path


def valid(text: str, schema: dict = SCHEMA) -> bool:
    try:
        jsonschema_rs.validate(schema, json.loads(text))
    except (ValueError, jsonschema_rs.ValidationError):
        return False
    return True


@pytest.mark.parametrize("speculative", [False, True])
def test_sampled_json_follows_its_schema_beside_free_rows(checkpoint, mtp_checkpoint, speculative):
    """20 samples at temperature 1 from random weights, batched with unconstrained requests: every constrained
    one is valid JSON of the schema, ended by the grammar (not by the length limit)."""
    llm = LLM(mtp_checkpoint if speculative else checkpoint, max_num_seqs=8, max_model_len=512,
              speculative=speculative)
    constrained = SamplingParams(n=4, max_tokens=300, temperature=1.0, seed=1, structured=StructuredOutput(json=SCHEMA))
    free = SamplingParams(n=2, max_tokens=30, temperature=1.0, seed=2)
    prompts = ["hello", "the cat", "7 + 5", "x", "a long prompt about nothing"]
    outputs = llm.generate(prompts + prompts[:2], [constrained] * len(prompts) + [free] * 2)
    texts = [c.text for out in outputs[:len(prompts)] for c in out.outputs]
    assert len(texts) == 20 and all(valid(t) for t in texts), [t for t in texts if not valid(t)]
    assert all(c.finish_reason == "stop" for out in outputs[:len(prompts)] for c in out.outputs)
    assert sum(not valid(c.text) for out in outputs[len(prompts):] for c in out.outputs) >= 3  # free rows: free


@pytest.mark.parametrize("truncation", [{"top_k": 1}, {"top_p": 0.01}, {"min_p": 0.99}, {"temperature": 0}])
def test_the_grammar_masks_before_truncation(checkpoint, mtp_checkpoint, truncation):
    """Masked after top-k / top-p / min-p, a row could keep no allowed token at all; masked first, truncation
    picks among allowed ones: valid JSON, with speculation too."""
    for path, speculative in ((checkpoint, False), (mtp_checkpoint, True)):
        llm = LLM(path, max_num_seqs=2, max_model_len=512, speculative=speculative)
        params = SamplingParams(**{"temperature": 1.0, "seed": 4, "max_tokens": 300, **truncation},
                                structured=StructuredOutput(json=SCHEMA))
        out = llm.generate("the cat", params)[0].outputs[0]
        assert valid(out.text) and out.finish_reason == "stop" and out.stop_reason is None, out.text


def test_regex_choice_and_a_grammar_that_starts_after_a_token(checkpoint):
    llm = LLM(checkpoint, max_num_seqs=4, max_model_len=512)
    sampled = SamplingParams(max_tokens=40, temperature=1.0, seed=5)

    def one(structured: StructuredOutput, **extra) -> str:
        params = SamplingParams(**{**sampled.__dict__, "structured": structured, **extra})
        return llm.generate("hi", params)[0].outputs[0].text

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", one(StructuredOutput(regex=r"[0-9]{3}-[a-z]{2}")))
    assert one(StructuredOutput(choice=["yes", "no", "maybe not"])) in ("yes", "no", "maybe not")
    # free text until token `after` (an R1 reply's </think>), then the grammar; the bias makes `after` come first
    after = llm.tokenizer.token_id("</think>")
    text = one(StructuredOutput(json={"type": "object"}, after=after), logit_bias={after: 100}, max_tokens=200)
    assert text.startswith("</think>") and json.loads(text.removeprefix("</think>")) is not None
    # a budget of 6 tokens of free text: `after` is forced at the seventh at the latest
    budget = SamplingParams(max_tokens=200, temperature=1.0, seed=5,
                            structured=StructuredOutput(regex="[a-z]{3}", after=after, after_within=6))
    ids = llm.generate("hi", budget)[0].outputs[0].token_ids
    assert after in ids[:7] and re.fullmatch("[a-z]{3}", llm.tokenizer.decode(ids[ids.index(after) + 1:]))
    # the free text cannot end the reply: with EOS favoured it is still the budget, then `after`, then the grammar
    eager = SamplingParams(**{**budget.__dict__, "logit_bias": {llm.tokenizer.eos_token_id: 100}})
    ids = llm.generate("hi", eager)[0].outputs[0].token_ids
    assert ids.index(after) == 6 and re.fullmatch("[a-z]{3}", llm.tokenizer.decode(ids[7:]))


@pytest.mark.parametrize("extra_tokens, model_vocab", [(5, 320), (0, 400)])
def test_a_vocabulary_larger_on_either_side(checkpoint, extra_tokens, model_vocab):
    """Tokens past the model's rows (never sampled), or model rows past the tokenizer's (padding, as DeepSeek's
    129,280 rows over its 128,815 tokens): the masks still cover the model's rows."""
    from tokenizers import AddedToken

    tokenizer = Tokenizer.from_dir(checkpoint)
    tokenizer.backend.add_tokens([AddedToken(f"<extra{i}>", special=True) for i in range(extra_tokens)])
    model = nanoseek_model(seed=3, vocab_size=model_vocab, max_position_embeddings=4096)
    llm = LLM(model, tokenizer=tokenizer, max_num_seqs=2, max_model_len=256)
    params = SamplingParams(max_tokens=50, temperature=1.0, seed=0, structured=StructuredOutput(regex="[a-z]{4}"))
    assert re.fullmatch("[a-z]{4}", llm.generate("hi", params)[0].outputs[0].text)


@pytest.mark.parametrize(("structured", "message"), [
    (StructuredOutput(json={"type": "objectx"}), "objectx"),
    (StructuredOutput(regex="(unclosed"), "structured"),
    (StructuredOutput(json={"type": "object"}, regex="a"), "exactly one of json, regex, choice, grammar"),
    (StructuredOutput(choice=[]), "non-empty strings"),
])
def test_bad_grammars_are_refused_naming_structured(checkpoint, structured, message):
    llm = LLM(checkpoint, max_num_seqs=2, max_model_len=128)
    with pytest.raises(EngineError, match=message) as refused:
        llm.generate("hi", SamplingParams(structured=structured))
    assert refused.value.param == "structured" and not llm.scheduler.busy


# ---- response_format through the server ------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(checkpoint):
    server = Server(checkpoint, "--api-key", KEY, "--max-num-seqs", "8", "--max-model-len", "1024")
    yield server
    server.stop()


def test_json_schema_strict_output_validates_for_20_samples(server):
    client = server.client(max_retries=0)
    form = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}
    replies = [client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=form, max_tokens=300,
                                              temperature=1.0, seed=seed, n=4, extra_body={"thinking": {
                                                  "type": "disabled"}}) for seed in range(5)]
    contents = [choice.message.content for reply in replies for choice in reply.choices]
    assert len(contents) == 20 and all(valid(c) for c in contents), [c for c in contents if not valid(c)]
    # any object: no bound on its strings, so random weights may run to the cap (DeepSeek's JSON mode docs:
    # set max_tokens so that the JSON is not cut off); what there is opens an object and ends it if it stops
    anything = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "json_object"},
                                              max_tokens=200, extra_body={"thinking": {"type": "disabled"}}).choices[0]
    assert anything.message.content.startswith("{")
    assert anything.finish_reason == "length" or isinstance(json.loads(anything.message.content), dict)


def test_json_after_the_think_block_keeps_the_reasoning(server, checkpoint):
    """An R1 prompt: the reasoning is free text, the JSON comes after </think>: at once when the bias closes
    the block, or after half the tokens, where the block is closed for the model."""
    think_close = Tokenizer.from_dir(checkpoint).token_id("</think>")
    client = server.client()
    form = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA}}
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=form, max_tokens=200,
                                           temperature=1.0, seed=3, logit_bias={str(think_close): 100})
    message = reply.choices[0].message
    assert getattr(message, "reasoning_content", None) == "" and valid(message.content)
    thought = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=form, max_tokens=300,
                                             temperature=1.0, seed=3)
    assert len(thought.choices[0].message.reasoning_content) > 0 and valid(thought.choices[0].message.content)
    assert thought.usage.completion_tokens_details.reasoning_tokens <= 150 + 1


@pytest.mark.parametrize(("form", "param", "message"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}},
     "response_format.json_schema.schema", "additionalProperties: false"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}},
                                               "additionalProperties": False}},
        "required": ["a"], "additionalProperties": False}}},
     "response_format.json_schema.schema", ".properties.a: strict mode needs every property required; not "
                                           "required: b"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}, "response_format",
     "objectx"),
    ({"type": "json_schema"}, "response_format.json_schema.schema", "required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "object", "properties": [], "additionalProperties": False}}},
     "response_format.json_schema.schema", ".properties: must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "object", "properties": {}, "required": [["a"]], "additionalProperties": False}}},
     "response_format.json_schema.schema", ".required: must be a list of property names"),
])
def test_bad_response_formats_are_400(server, form, param, message):
    response = httpx.post(server.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": MODEL, "messages": MESSAGES, "response_format": form})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_streamed_json_reassembles_to_valid_json(server):
    stream = server.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, max_tokens=300, temperature=1.0, seed=9,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}},
        extra_body={"thinking": {"type": "disabled"}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert valid(text)
    with pytest.raises(openai.BadRequestError):
        server.client(max_retries=0).chat.completions.create(
            model=MODEL, messages=MESSAGES, response_format={"type": "json_schema", "json_schema": {"name": "r"}})
