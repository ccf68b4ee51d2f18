"""Long context: the passkey corpus and its held-out split, YaRN context extension of a checkpoint, and the
long-context evaluation (`nanoseek eval-long`)."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from test_train import SMALL_RUN, pretrain

import nanoseek
from nanoseek.cli import build_parser
from nanoseek.config import ConfigError, extended_context, preset
from nanoseek.long_context import evaluate_long, fit_document, score
from nanoseek.model import build_model, with_config
from nanoseek.tasks.corpus import generate_corpus
from nanoseek.tasks.passkey import (
    PLANT,
    QUESTION,
    draw_key,
    generate_passkey_corpus,
    haystack,
    held_out_key,
    parse_chars,
    passkey_documents,
)
from nanoseek.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train import pretrain as pretrain_stage

PLANTED = re.compile(re.escape(PLANT.split("{key}")[0]) + r"(\d+)" + re.escape(PLANT.split("{key}")[1]))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(generate_corpus(300, seed=1), 320)


def test_held_out_keys_are_an_eighth_and_each_split_draws_only_its_own():
    share = sum(held_out_key(k) for k in range(10_000, 30_000)) / 20_000
    assert 0.10 < share < 0.15
    rng = random.Random(0)
    assert all(held_out_key(draw_key(rng, "eval")) for _ in range(200))
    assert not any(held_out_key(draw_key(rng, "train")) for _ in range(200))
    with pytest.raises(ValueError, match="split"):
        draw_key(rng, "test")


def test_no_training_document_plants_a_key_the_evaluation_asks_for(tokenizer):
    training = list(generate_passkey_corpus(300, seed=0, chars=(200, 600)))
    planted = [int(k) for doc in training for k in PLANTED.findall(doc)]
    assert len(planted) == 300 and not any(map(held_out_key, planted))
    rng, stream = random.Random(0), haystack(0, "eval")
    asked = {fit_document(tokenizer, 256, rng, stream).document.key for _ in range(30)}
    assert all(map(held_out_key, asked)) and not asked & set(planted)
    assert not any(doc in "".join(training) for doc in (next(haystack(0, "eval")), next(haystack(5, "eval"))))


def test_documents_plant_one_key_at_a_uniform_depth_and_ask_for_it_last():
    docs = list(passkey_documents(40, seed=3, chars=(300, 900)))
    assert docs == list(passkey_documents(40, seed=3, chars=(300, 900)))  # seeded
    for doc in docs:
        assert PLANTED.findall(doc.text) == [str(doc.key)] and doc.text.endswith(f"{QUESTION}{doc.key}.\n")
        assert 300 <= len(doc.text) - len(PLANT.format(key=doc.key)) - len(QUESTION) - 8 <= 900 + 2_000
    depths = [d.relative_depth for d in docs]
    assert min(depths) < 0.25 and max(depths) > 0.75
    for bad in ("900,300", "0,10", "12", "a,b"):
        with pytest.raises(ValueError, match="--corpus-doc-chars"):
            parse_chars(bad)


def test_a_fitted_document_fills_the_context_and_ends_with_the_key(tokenizer):
    rng, stream = random.Random(1), haystack(1, "eval")
    for tokens in (256, 512, 1024):
        fitted = fit_document(tokenizer, tokens, rng, stream)
        assert tokens - 128 <= len(fitted.ids) <= tokens  # short of it by less than a haystack document
        assert tokenizer.decode(fitted.ids[fitted.answer_start:]) == str(fitted.document.key)
        assert fitted.ids[: fitted.answer_start] == tokenizer.encode(fitted.document.prompt)
    with pytest.raises(ValueError, match="--contexts: 64 tokens"):
        fit_document(tokenizer, 64, rng, stream)


def test_score_counts_a_key_as_retrieved_exactly_when_greedy_decoding_writes_it(tokenizer):
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=320)).eval()
    fitted = fit_document(tokenizer, 200, random.Random(2), haystack(2, "eval"))
    prompt, answer = fitted.ids[: fitted.answer_start], len(fitted.ids) - fitted.answer_start
    first = score(model, fitted)
    assert first.tokens == len(fitted.ids) - 1 and 0 < first.loss / first.tokens < 2 * math.log(320)
    greedy = list(prompt)
    with torch.no_grad():
        for _ in range(answer):
            greedy.append(int(model(torch.tensor([greedy]))[0, -1].argmax()))
    assert first.retrieved == (greedy == fitted.ids)
    written = score(model, replace(fitted, ids=greedy))  # the key as the model writes it: retrieved
    assert written.retrieved and written.key_tokens_right == 1
    wrong = score(model, replace(fitted, ids=greedy[:-1] + [(greedy[-1] + 1) % 320]))
    assert not wrong.retrieved and wrong.key_tokens_right == pytest.approx(1 - 1 / answer)


def test_extended_context_stretches_yarn_from_the_trained_length():
    nano = preset("nano")
    extended = extended_context(nano, 8192, 256)
    assert extended.max_position_embeddings == 8192
    assert extended.rope_scaling["factor"] == 32 and extended.rope_scaling["original_max_position_embeddings"] == 256
    assert extended_context(extended, 16384).rope_scaling["factor"] == 64  # the original length is kept
    tiny = preset("tiny")  # YaRN already: 16 -> 640
    assert extended_context(tiny, 1280).rope_scaling["factor"] == 80
    with pytest.raises(ConfigError, match="--extend-context"):
        extended_context(nano, 256, 256)
    model = build_model(preset("tiny")).eval()
    rebuilt = with_config(model, extended_context(model.config, 1280))
    pairs = zip(model.state_dict().values(), rebuilt.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    ids = torch.randint(0, 128, (1, 20))
    assert not torch.allclose(model(ids), rebuilt(ids))  # the RoPE and softmax scale changed, nothing else


def test_pretrain_extends_a_checkpoint_on_the_passkey_corpus_and_eval_long_scores_it(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    pretrain(*SMALL_RUN, "--out", str(tmp_path / "base"), "--max-steps", "2")
    common = ["--init", str(tmp_path / "base" / "latest"), "--corpus", "passkey", "--corpus-docs", "60",
              "--corpus-doc-chars", "300,900", "--seq-len", "96", "--batch-size", "2", "--max-steps", "2",
              "--eval-every", "2", "--eval-batches", "1"]
    pretrain(*common, "--extend-context", "1280", "--out", str(tmp_path / "long"))
    ours = nanoseek.load_model(tmp_path / "long" / "latest")
    assert ours.config.max_position_embeddings == 1280 and ours.config.rope_scaling["factor"] == 80
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "long" / "latest", attn_implementation="eager").eval()
    ids = torch.randint(0, 300, (1, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() <= 1e-4
    report = tmp_path / "long.json"
    subprocess.run([sys.executable, "-m", "nanoseek", "eval-long", "--model", str(tmp_path / "long" / "latest"),
                    "--contexts", "128,256", "--documents", "3", "--json", str(report)], check=True,
                   capture_output=True, text=True)
    contexts = json.loads(report.read_text())["contexts"]
    assert set(contexts) == {"128", "256"} and all(c["documents"] == 3 for c in contexts.values())
    assert all(0 < c["loss"] < 10 and 0 <= c["accuracy"] <= c["key_tokens"] <= 100 for c in contexts.values())
    tokenizer = Tokenizer.from_dir(tmp_path / "long" / "latest")
    assert evaluate_long(ours, tokenizer, [128], 3)["128"] == contexts["128"]  # seeded: the same documents
    for flag, value in (("--extend-context", "16"), ("--trained-context", "16")):  # in-process: no startup cost
        args = build_parser().parse_args(["pretrain", *common, flag, value, "--out", str(tmp_path / "a")])
        with pytest.raises(ValueError, match=flag):
            pretrain_stage._model_config(args)
    run = pretrain(*SMALL_RUN, "--corpus-doc-chars", "10,20", "--out", str(tmp_path / "c"), check=False)
    assert run.returncode != 0 and "--corpus-doc-chars" in run.stderr and "Traceback" not in run.stderr, run.stderr
