"""The compiled decode steps (`LLM(compile=True)`): transformers' greedy tokens and the eager engine's log-probs,
for both families, one row and many, plain and speculative; and what it refuses."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model
from test_dense import CASES, hf_dense
from test_engine import GREEDY, hf_greedy, prompts
from torch._dynamo.utils import counters

import nanoseek
from nanoseek import LLM, SamplingParams
from nanoseek.model.layers import ROW_DOT_ROWS

# four rows take the row-reduction path of the compiled step, six its GEMM path (ROW_DOT_ROWS = 4)
LENGTHS = (7, 23, 3, 15, 9, 4)


@pytest.fixture(autouse=True)
def no_silent_eager_fallback():
    """Past its recompile limit dynamo would run the layer eager, and eager would be tested against eager."""
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


def assert_compiled(llm: LLM) -> None:
    """The decode steps ran as compiled programs, not eager: dynamo captured graphs for them."""
    assert llm.model.layer_runners(1, cached=True)[0] is not llm.model.layer_runners(1, cached=False)[0]
    assert counters["stats"]["unique_graphs"] >= 2  # a layer kind and the final norm + head


def test_compiled_moe_decode_gives_transformers_greedy_tokens(tmp_path):
    assert len(LENGTHS) > ROW_DOT_ROWS
    hf = hf_model(num_nextn_predict_layers=1)
    hf.save_pretrained(tmp_path)
    llm = LLM(tmp_path, max_num_seqs=6, compile=True)
    batch = prompts(*LENGTHS)
    expected = [hf_greedy(hf, p, 64) for p in batch]
    assert llm.generate(batch[1], GREEDY)[0].outputs[0].token_ids == expected[1]
    for rows in (ROW_DOT_ROWS, len(batch)):
        outputs = llm.generate(batch[:rows], GREEDY)
        assert [o.outputs[0].token_ids for o in outputs] == expected[:rows]
    assert_compiled(llm)


def test_compiled_speculative_decode_equals_plain_greedy(tiny_checkpoint):
    batch = prompts(17)  # one row of two tokens: the row reductions and the gathered experts
    expected = LLM(tiny_checkpoint).generate(batch, GREEDY)
    llm = LLM(tiny_checkpoint, speculative=True, compile=True)
    got = llm.generate(batch, GREEDY)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert_compiled(llm)


@pytest.mark.parametrize("rows", [2, 12])
def test_compiled_decode_log_probs_equal_eager(tiny_checkpoint, rows):
    """The eager engine's model (stored [in, out] for eager CPU decode) handed on and compiled. Two rows take
    the row reductions and the gathered experts; twelve (36 (token, expert) pairs of 8 experts) the GEMMs and
    the sorted experts (their per-expert loop: compiled, fp32 grouped GEMMs are refused)."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=3)
    batch = prompts(*(6 + 5 * i for i in range(rows)))
    llm = LLM(tiny_checkpoint, max_num_seqs=rows)
    eager = llm.generate(batch, params)
    compiled_llm = LLM(llm.model, max_num_seqs=rows, compile=True)
    compiled = compiled_llm.generate(batch, params)
    assert_compiled(compiled_llm)
    for a, b in zip(eager, compiled, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert x.keys() == y.keys()
            assert max(abs(x[k] - y[k]) for k in x) < 1e-4


def test_compiled_dense_decode_gives_transformers_greedy_tokens(tmp_path):
    family, overrides = CASES["qwen2-tied"]
    reference = hf_dense(family, seed=2, **overrides)
    reference.save_pretrained(tmp_path)
    batch = [[5, 9, 17, 33, 2], [7] * 11 + [40, 41], [3, 4], [60] * 9, [8, 8, 8], [99] * 6]
    llm = LLM(tmp_path, max_num_seqs=6, compile=True)
    for rows in (1, len(batch)):
        outputs = llm.generate(batch[:rows], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
        for prompt, output in zip(batch[:rows], outputs, strict=True):
            generated = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)
            assert output.outputs[0].token_ids == generated[0, len(prompt):].tolist()
    assert_compiled(llm)


def assert_same_but_at_near_ties(eager: list, compiled: list, tolerance: float) -> None:
    """Each row's tokens equal and its log-probs within `tolerance` up to a first difference, if any, which
    must be a near-tie: the compiled path's token among eager's top ones, within `tolerance` of eager's choice.
    (int8 layers round their outputs to bf16, so a difference in the order of the fp32 sums can move a value
    by a bf16 step.)"""
    for a, b in zip(eager, compiled, strict=True):
        a, b = a.outputs[0], b.outputs[0]
        for token_a, token_b, top_a, top_b in zip(a.token_ids, b.token_ids, a.logprobs, b.logprobs, strict=True):
            if token_a != token_b:
                assert token_b in top_a and abs(top_a[token_b] - top_a[token_a]) < tolerance
                break
            assert max(abs(top_a[k] - top_b[k]) for k in top_a.keys() & top_b.keys()) < tolerance


def test_compiled_int8_decode_follows_the_eager_int8_one(tiny_checkpoint):
    """int8 weights, compiled: the kernel's products as row reductions and the stacked int8 experts gathered
    at two rows; the kernel and the sorted experts at twelve."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=3)
    batch = prompts(*(6 + 5 * i for i in range(12)))
    eager = LLM(tiny_checkpoint, max_num_seqs=12, quantize="int8")
    compiled = LLM(tiny_checkpoint, max_num_seqs=12, quantize="int8", compile=True)
    for rows in (2, 12):
        assert_same_but_at_near_ties(eager.generate(batch[:rows], params), compiled.generate(batch[:rows], params),
                                     tolerance=0.02)
    assert_compiled(compiled)


def test_compile_refuses_int4_weights(tiny_checkpoint):
    with pytest.raises(ValueError, match="compile"):
        LLM(tiny_checkpoint, compile=True, quantize="int4")  # before loading
    model = nanoseek.load_model(tiny_checkpoint).quantize("int4")
    with pytest.raises(ValueError, match="int4 weights run eager"):
        model.compile_decode()
