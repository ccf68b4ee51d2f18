"""Checkpoints as transformers 5 writes them: the chat template in chat_template.jinja, sampling defaults in
generation_config.json; `LLM.chat` and the chat endpoint on such a checkpoint (transformers is the oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CHAT_TEMPLATE, make_tokenizer

import nanoseek
from nanoseek import LLM, SamplingParams
from nanoseek.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "what is 2 + 3?"}]
DEFAULTS = {"temperature": 0.5, "top_p": 0.7, "top_k": 5, "repetition_penalty": 1.1, "max_new_tokens": 7}


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    """A random Llama written by transformers' save_pretrained, with its tokenizer (template in
    chat_template.jinja) and a generation_config.json with sampling defaults."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("hf") / "llama"
    ours = make_tokenizer()
    theirs = PreTrainedTokenizerFast(tokenizer_object=ours.backend, bos_token="<bos>", eos_token="<eos>",
                                     unk_token="<unk>")
    theirs.chat_template = CHAT_TEMPLATE
    theirs.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, do_sample=True, **DEFAULTS)
    model.save_pretrained(path)
    return path


def test_transformers_5_writes_the_template_to_its_own_file_and_we_read_it(hf_checkpoint):
    from transformers import AutoTokenizer

    assert (hf_checkpoint / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((hf_checkpoint / "tokenizer_config.json").read_text())
    ours, theirs = Tokenizer.from_dir(hf_checkpoint), AutoTokenizer.from_pretrained(hf_checkpoint)
    text = ours.apply_chat_template(MESSAGES)
    assert text == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def test_the_template_file_wins_over_the_config_entry_and_named_ones_are_kept(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.save(tmp_path)  # the template inside tokenizer_config.json, the older place
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}file:{{ messages[0]['content'] }}")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("tools")
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.apply_chat_template(MESSAGES) == "<bos>file:what is 2 + 3?"
    assert loaded.config["chat_template"]["tool_use"] == "tools"


def test_generation_config_defaults_apply_unless_the_call_says_otherwise(hf_checkpoint):
    llm = LLM(hf_checkpoint, max_model_len=128)
    defaults = llm.default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty,
            defaults.max_tokens) == (0.5, 0.7, 5, 1.1, 7)
    assert llm.eos_ids == {1}
    assert len(llm.generate([[0, 5, 9]])[0].outputs[0].token_ids) <= 7
    explicit = llm.generate([[0, 5, 9]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert len(explicit[0].outputs[0].token_ids) == 12


def test_a_bad_generation_config_value_is_named(hf_checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(hf_checkpoint, broken)
    (broken / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match=r"generation_config.json: SamplingParams.temperature = -1"):
        LLM(broken)


def test_llm_chat_uses_the_models_template_and_splits_the_reasoning(hf_checkpoint):
    from transformers import AutoTokenizer

    llm = LLM(hf_checkpoint, max_model_len=128)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    (result,) = llm.chat(MESSAGES, params)
    theirs = AutoTokenizer.from_pretrained(hf_checkpoint)
    expected = theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    assert result.prompt_token_ids == expected
    out = result.outputs[0]
    assert len(out.token_ids) == 6 and out.reasoning_content is not None  # the template opened the think block
    assert out.reasoning_content + (out.content or "") == out.text.replace("</think>", "")
    both = llm.chat([MESSAGES, [*MESSAGES, {"role": "assistant", "content": "5"}, *MESSAGES]], params)
    assert len(both) == 2 and both[0].outputs[0].text == out.text  # greedy: the same conversation, the same reply


def test_llm_chat_without_a_template_is_a_clear_error(tmp_path):
    nanoseek.CausalLM(nanoseek.preset("tiny")).save_pretrained(tmp_path)
    tokenizer = make_tokenizer()
    tokenizer.config.pop("chat_template")
    tokenizer.save(tmp_path)
    with pytest.raises(ValueError, match="no chat template; use generate"):
        LLM(tmp_path, max_model_len=64).chat(MESSAGES)


def test_the_chat_endpoint_serves_a_transformers_checkpoint_with_its_defaults(hf_checkpoint):
    from test_serve import MODEL, Server

    server = Server(hf_checkpoint, "--max-model-len", "128")
    try:
        client = server.client()
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=1)
        assert reply.usage.completion_tokens <= 7  # generation_config.json's max_new_tokens
        assert reply.choices[0].message.reasoning_content is not None  # the template opened the think block
        longer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, seed=1,
                                                extra_body={"ignore_eos": True})
        assert longer.usage.completion_tokens == 12  # the request's own value wins
    finally:
        server.stop()
