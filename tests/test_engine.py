"""The engine: greedy parity with transformers' generate, speculation, seeds, n, stops, streaming, bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import hf_model, make_tokenizer, nanoseek_model
from test_parity import MATRIX

from nanoseek import LLM, SamplingParams
from nanoseek.sizing import kv_cache_bytes_per_token

GREEDY = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)


def prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 128, (n,), generator=gen).tolist() for n in lengths]


def hf_greedy(hf, prompt: list[int], new_tokens: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("case", ["base", "no-q-lora", "rope-half-split", "all-moe", "no-yarn"])
def test_greedy_matches_transformers_generate(case, tmp_path):
    hf = hf_model(**MATRIX[case])
    hf.save_pretrained(tmp_path)
    llm = LLM(tmp_path, max_num_seqs=4)
    batch = prompts(7, 23, 3, 15)
    alone = llm.generate(batch[1], GREEDY)[0].outputs[0]
    together = llm.generate(batch, GREEDY)
    expected = [hf_greedy(hf, p, 64) for p in batch]
    assert alone.token_ids == expected[1] and alone.finish_reason == "length"
    assert [o.outputs[0].token_ids for o in together] == expected


def test_continuous_batching_admits_waiting_requests_as_slots_free(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, max_num_seqs=2)
    batch = prompts(4, 9, 6, 12, 5)
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (3, 20, 7, 11, 2)]
    together = llm.generate(batch, params)
    assert [len(o.outputs[0].token_ids) for o in together] == [3, 20, 7, 11, 2]
    for prompt, p, out in zip(batch, params, together, strict=True):
        assert llm.generate(prompt, p)[0].outputs[0].token_ids == out.outputs[0].token_ids
    assert sorted(llm.scheduler.free_slots) == [0, 1] and not llm.requests


def test_speculative_greedy_equals_plain_greedy(tiny_checkpoint):
    plain, spec = LLM(tiny_checkpoint), LLM(tiny_checkpoint, speculative=True)
    batch = prompts(5, 17, 9, 30)
    expected = plain.generate(batch, GREEDY)
    got = spec.generate(batch, GREEDY)
    for a, b in zip(expected, got, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert b.metrics["draft_tokens"] >= 32 and 0 <= b.metrics["accepted_tokens"] <= b.metrics["draft_tokens"]


def test_accepted_drafts_skip_decode_steps(tiny_checkpoint):
    """An MTP module reduced to the main model's head on h_{i-1} repeats the main model's last prediction, which
    the random model's greedy loops accept; each accepted draft saves a decode step."""
    spec = LLM(tiny_checkpoint, speculative=True)
    plain = LLM(tiny_checkpoint)
    module = spec.model.mtp[0]
    with torch.no_grad():  # make the MTP block an identity on the main hidden state: h' = hnorm(h) ~ h
        module.eh_proj.weight.zero_()
        module.eh_proj.weight[:, 64:] = torch.eye(64)
        module.hnorm.weight.copy_(torch.ones(64))
        mlp = module.mlp
        for p in (module.self_attn.o_proj.weight, mlp.experts.w_down, mlp.shared_experts.down_proj.weight):
            p.zero_()
        module.shared_head["norm"].weight.copy_(spec.model.model.norm.weight / module.hnorm.weight)
    out = spec.generate(prompts(12), GREEDY)[0]
    assert out.outputs[0].token_ids == plain.generate(prompts(12), GREEDY)[0].outputs[0].token_ids
    drafted, accepted = out.metrics["draft_tokens"], out.metrics["accepted_tokens"]
    assert accepted > 0 and drafted < 63 <= drafted + accepted  # 1 token from prefill, 1 + accepted per step


@pytest.mark.parametrize("speculative", [False, True])
def test_same_seed_same_output_alone_or_in_a_batch(tiny_checkpoint, speculative):
    llm = LLM(tiny_checkpoint, speculative=speculative)
    seeded = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    batch = prompts(6, 14, 6)
    alone = llm.generate(batch[0], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=25, temperature=1.0, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)]
    mixed = llm.generate([batch[1], batch[0], batch[2]], [others[0], seeded, others[1]])
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, top_k=50, seed=99, ignore_eos=True)
    assert llm.generate(batch[0], other_seed)[0].outputs[0].token_ids != alone


def test_n_completions(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, max_num_seqs=4)
    out = llm.generate(prompts(8), SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=5, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    greedy = llm.generate(prompts(8), SamplingParams(n=2, max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids  # the forked cache equals the leader's


def test_cache_bytes_per_token_equal_the_formula(tiny_checkpoint):
    llm = LLM(tiny_checkpoint)
    config = llm.model.config
    assert llm.runner.cache.bytes_per_token() == kv_cache_bytes_per_token(config, 4)[0]
    assert llm.runner.cache.bytes_per_token() == (config.kv_lora_rank + config.qk_rope_head_dim) * 3 * 4


def test_logprobs(tiny_checkpoint):
    llm = LLM(tiny_checkpoint)
    prompt = prompts(10)[0]
    out = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True))[0]
    completion = out.outputs[0]
    ids = torch.tensor([prompt + completion.token_ids])
    with torch.no_grad():
        reference = llm.model(ids)[0].log_softmax(-1)
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        expected = reference[len(prompt) - 1 + step]
        assert abs(entry[token] - expected[token].item()) < 1e-4
        assert len(entry) == 3  # greedy: the chosen token is the top one
        assert max(entry.values()) == pytest.approx(expected.max().item(), abs=1e-4)
    pairs = zip(completion.token_ids, completion.logprobs, strict=True)
    assert completion.cumulative_logprob == pytest.approx(sum(entry[token] for token, entry in pairs))


def test_prompt_logprobs_score_every_prompt_token_even_past_the_prefix_cache(tiny_checkpoint):
    """vLLM's prompt_logprobs: None for the first token, then each token's log-probability given those before
    it (and the k most likely), equal to a forward pass; a prompt the prefix cache holds is scored in full."""
    llm = LLM(tiny_checkpoint, prefix_cache_tokens=256)
    prompt = prompts(40)[0]
    with torch.no_grad():
        reference = llm.model(torch.tensor([prompt]))[0].log_softmax(-1)
    llm.generate(prompt, SamplingParams(max_tokens=1))  # now cached
    scored = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2, n=2)
    out = llm.generate(prompt, scored)[0]
    assert out.num_cached_tokens == 0 and out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i, token in enumerate(prompt[1:], start=1):
        entry, expected = out.prompt_logprobs[i], reference[i - 1]
        assert abs(entry[token] - expected[token].item()) < 1e-4 and len(entry) in (2, 3)
        assert max(entry.values()) == pytest.approx(expected.max().item(), abs=1e-4)
    assert llm.generate(prompt, SamplingParams(max_tokens=1))[0].prompt_logprobs is None


def test_logit_bias_moves_greedy_and_sampled_tokens(tiny_checkpoint):
    llm = LLM(tiny_checkpoint)
    prompt = prompts(10)[0]
    free = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
    banned = set(free[:4])
    params = dict(max_tokens=64, ignore_eos=True, logit_bias={t: -100 for t in banned})
    biased = llm.generate(prompt, SamplingParams(temperature=0, **params))[0].outputs[0].token_ids
    sampled = llm.generate(prompt, SamplingParams(temperature=1.0, seed=3, **params))[0].outputs[0].token_ids
    assert not banned & (set(biased) | set(sampled))
    forced = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=3, logit_bias={7: 100}))
    assert forced[0].outputs[0].token_ids == [7] * 8
    with pytest.raises(ValueError, match=r"logit_bias: token id 999 is outside the vocabulary \[0, 128\)"):
        llm.generate(prompt, SamplingParams(logit_bias={999: 1.0}))


def test_stop_strings_across_token_boundaries(chat_checkpoint):
    llm = LLM(chat_checkpoint)
    free = llm.generate("what is 2", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0].outputs[0]
    texts = [llm.tokenizer.decode(free.token_ids[:i]) for i in range(len(free.token_ids) + 1)]
    full = texts[-1]
    # a two-character stop string: the last character of one token's text and the first of the next one's,
    # where it occurs first in the text
    boundaries = [len(texts[i]) for i in range(1, len(texts) - 1)
                  if texts[i] != texts[i - 1] and len(texts[i + 1]) > len(texts[i])]
    at = next(b - 1 for b in boundaries if full.find(full[b - 1:b + 1]) == b - 1)
    stop = full[at:at + 2]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    completion = llm.generate("what is 2", params)[0].outputs[0]
    assert completion.text == full[:at] and stop not in completion.text
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert len(completion.token_ids) < len(free.token_ids)
    streamed = "".join(d.text for d in llm.stream("what is 2", params))
    assert streamed == completion.text


def test_stream_matches_generate(chat_checkpoint):
    llm = LLM(chat_checkpoint, speculative=True)
    params = SamplingParams(max_tokens=30, temperature=0.7, seed=3, ignore_eos=True)
    whole = llm.generate("hello there", params)[0].outputs[0]
    deltas = list(llm.stream("hello there", params))
    assert "".join(d.text for d in deltas) == whole.text
    assert sum((d.token_ids for d in deltas), []) == whole.token_ids
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_eos_ends_generation(tiny_checkpoint):
    llm = LLM(tiny_checkpoint)
    free = llm.generate(prompts(6), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].outputs[0]
    stop_at = free.token_ids[4]
    out = llm.generate(prompts(6), SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_at]))
    completion = out[0].outputs[0]
    assert completion.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_at


BAD_PARAMS = [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(n=0), "n"), (dict(logprobs=21), "logprobs"),
    (dict(stop=[""]), "stop"), (dict(seed=1.5), "seed"), (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(logit_bias={3: 101}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
]


@pytest.mark.parametrize(("change", "name"), BAD_PARAMS, ids=[f"{k}" for k, _ in BAD_PARAMS])
def test_bad_sampling_params_name_the_parameter(change, name):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name} = "):
        SamplingParams(**change)


def test_bad_prompts_name_the_problem_and_leave_nothing_allocated(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, max_num_seqs=2, max_model_len=32)
    good = prompts(4)[0]
    cases = [([], "prompt: is empty"), (list(range(40)), "prompt: 40 tokens do not fit max_model_len = 32"),
             ([5, 128, 7], r"prompt: token id 128 is outside the vocabulary \[0, 128\)"),
             ([5, -1], "token id -1 is outside"), ("some text", "a text prompt needs a tokenizer")]
    for prompt, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate([good, prompt], GREEDY)  # the good prompt must not be left running either
    with pytest.raises(ValueError, match=r"SamplingParams.n = 3: must be <= max_num_seqs \(2\)"):
        llm.generate(good, SamplingParams(n=3))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        llm.generate(good, SamplingParams(stop=["x"]))
    assert sorted(llm.scheduler.free_slots) == [0, 1] and not llm.requests and not llm.scheduler.busy
    assert llm.generate(good, SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids


def test_context_limit_ends_with_length(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, max_model_len=20)
    out = llm.generate(prompts(15), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_preset_name_and_model_object():
    llm = LLM("tiny")
    assert llm.generate([1, 2, 3], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    model = nanoseek_model()
    assert LLM(model).model is model


def test_text_prompt_and_tokenizer_round_trip(chat_checkpoint):
    llm = LLM(chat_checkpoint)
    out = llm.generate("the cat", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert out.prompt == "the cat" and out.prompt_token_ids == make_tokenizer().encode("the cat")
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)


def test_sampler_processing_follows_vllm():
    from nanoseek.engine.sampler import SamplingBatch, process

    def processed(logits, counts=None, seen=None, **kw):
        batch = SamplingBatch.build([SamplingParams(**kw)], [0], [0], logits.shape[-1], torch.device("cpu"))
        return process(logits[None], batch, counts, seen)[0]

    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    # top-p acts on the distribution renormalised after top-k: [.625, .375] -> top_p 0.6 keeps one token
    assert torch.isinf(processed(logits, top_k=2, top_p=0.6))[1:].all()
    assert not torch.isinf(processed(logits, top_p=0.8))[:2].any() and torch.isinf(processed(logits, top_p=0.8))[2]
    assert torch.isinf(processed(logits, min_p=0.5)).tolist() == [False, False, True]  # 0.2 < 0.5 * 0.5
    raw = torch.tensor([2.0, -1.0, 0.5, 1.0])
    counts, seen = torch.tensor([[2.0, 1.0, 0.0, 0.0]]), torch.tensor([[True, True, False, True]])
    out = processed(raw, counts, seen, temperature=0, presence_penalty=0.5, frequency_penalty=0.25,
                    repetition_penalty=2.0)
    # repetition on seen tokens (positive / r, negative * r), then frequency * count and presence if generated
    assert torch.allclose(out, torch.tensor([2.0 / 2 - 0.5 - 0.5, -1.0 * 2 - 0.25 - 0.5, 0.5, 1.0 / 2]))


def test_draws_follow_the_distribution_and_skip_impossible_tokens():
    """Inversion over unnormalised rows: frequencies near p over 40,000 seeded rows, tokens of probability 0
    (first, inside and last) never drawn, and a row's draw the same alone as in the batch."""
    from nanoseek.engine.sampler import SAMPLE, SamplingBatch, draw

    rows = 40_000
    p = torch.tensor([0.0, 0.6, 0.0, 0.3, 0.1, 0.0])
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(rows)]
    batch = SamplingBatch.build(params, list(range(rows)), [7] * rows, 6, torch.device("cpu"))
    tokens = draw(3 * p.expand(rows, -1), batch, SAMPLE)
    frequencies = torch.bincount(tokens, minlength=6).float() / rows
    assert (frequencies - p).abs().max() < 0.01 and frequencies[p == 0].sum() == 0
    one = SamplingBatch.build(params[123:124], [123], [7], 6, torch.device("cpu"))
    assert draw(3 * p[None], one, SAMPLE)[0] == tokens[123]
    assert draw(torch.full((1, 6), float("nan")), one, SAMPLE)[0] == 5  # an id in range, never V


def test_speculative_verification_keeps_the_target_distribution():
    """Drafts from q, verified against p: the emitted tokens follow p (and would follow q if drafts were
    always accepted), over 20,000 seeded rows."""
    from nanoseek.engine.sampler import DRAFT, SamplingBatch, draw, verify

    rows = 20_000
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    q = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2])
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(rows)]
    batch = SamplingBatch.build(params, list(range(rows)), [0] * rows, 5, torch.device("cpu"))
    draft = draw(q.expand(rows, -1), batch, DRAFT)
    tokens, accepted = verify(p.log().expand(rows, -1), q.expand(rows, -1), draft, batch)
    frequencies = torch.bincount(tokens, minlength=5).float() / rows
    assert (frequencies - p).abs().max() < 0.015 and frequencies[4] == 0
    assert 0.3 < accepted.float().mean() < 0.8  # both branches are exercised
    greedy = SamplingBatch.build([SamplingParams(temperature=0)] * 2, [0, 1], [0, 0], 5, torch.device("cpu"))
    tokens, accepted = verify(p.log().expand(2, -1), None, torch.tensor([0, 2]), greedy)
    assert tokens.tolist() == [0, 0] and accepted.tolist() == [True, False]


def test_interleaved_streams_each_see_their_end(tiny_checkpoint):
    llm = LLM(tiny_checkpoint)
    a = llm.stream(prompts(5)[0], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    b = llm.stream(prompts(7)[0], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True))
    got = {"a": [], "b": []}
    for name, stream in itertools.chain.from_iterable(itertools.repeat([("a", a), ("b", b)], 20)):
        delta = next(stream, None)
        if delta is not None:
            got[name].append(delta)
    assert sum(len(d.token_ids) for d in got["a"]) == 6 and got["a"][-1].finish_reason == "length"
    assert sum(len(d.token_ids) for d in got["b"]) == 9 and got["b"][-1].finish_reason == "length"


def test_a_bad_request_in_a_list_queues_nothing(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, max_num_seqs=2)
    good = SamplingParams(max_tokens=3, temperature=0)
    with pytest.raises(ValueError, match="SamplingParams.n = 3"):
        llm.generate([[1, 2, 3], [4, 5, 6]], [good, SamplingParams(n=3)])
    with pytest.raises(ValueError, match="SamplingParams.seed"):
        SamplingParams(seed=2**64)
    assert not llm.requests and not llm.scheduler.busy and sorted(llm.scheduler.free_slots) == [0, 1]


def test_prefix_cache_reuses_latents_without_changing_outputs(tiny_checkpoint):
    """Prompts sharing a start copy its latents from the prefix cache (in whole blocks, leaving at least one
    token to run) and decode exactly as they do without the cache."""
    plain = LLM(tiny_checkpoint, device="cpu", max_num_seqs=4)
    cached = LLM(plain.model, device="cpu", max_num_seqs=4, prefix_cache_tokens=256)
    shared = [3 + (i * 7) % 120 for i in range(40)]
    prompts = [shared + [5 + i] * extra for i, extra in enumerate((3, 9, 20))] + [shared[:32]]
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert cached.generate(prompts[:1], params)[0].num_cached_tokens == 0
    outputs = cached.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert [o.num_cached_tokens for o in outputs] == [32, 32, 32, 16]  # 40 shared tokens: two 16-token blocks
    with pytest.raises(ValueError, match="prefix_cache_tokens"):
        LLM(plain.model, device="cpu", speculative=True, prefix_cache_tokens=256)


def test_prefix_cache_evicts_least_recently_used_blocks(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu", max_num_seqs=2, prefix_cache_tokens=32)  # room for two blocks
    params = SamplingParams(temperature=0, max_tokens=2)
    first, second = [[start + i % 50 for i in range(20)] for start in (3, 60)]
    llm.generate([first], params)
    llm.generate([second], params)  # one block each: both kept
    assert llm.generate([first], params)[0].num_cached_tokens == 16
    third = [70 + i % 40 for i in range(20)]
    llm.generate([third], params)  # a third block evicts the least recently used: `second`
    assert llm.generate([second], params)[0].num_cached_tokens == 0  # ... which now evicts `first`
    assert llm.generate([third], params)[0].num_cached_tokens == 16


def test_text_ends_with_held_back_bytes_flushed(tmp_path):
    """A reply cut mid-character ends with the replacement character, not silently short (as decode does)."""
    from nanoseek.tasks.corpus import generate_corpus
    from nanoseek.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(generate_corpus(200), vocab_size=320)  # byte-level: pieces of characters
    nanoseek_model(vocab_size=320).save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    llm = LLM(tmp_path, device="cpu")
    cut = 0
    for seed in range(20):
        out = llm.generate("the cat", SamplingParams(max_tokens=8, temperature=1.0, seed=seed))[0].outputs[0]
        assert out.text == tokenizer.decode(out.token_ids)
        cut += out.text.endswith("\ufffd")
    assert cut  # the case was met


def test_dtype_by_name_as_vllm_takes_it(tiny_checkpoint):
    assert LLM(tiny_checkpoint, device="cpu", dtype="bfloat16", max_model_len=64).model.dtype == torch.bfloat16
    assert LLM(tiny_checkpoint, device="cpu", dtype="auto", max_model_len=64).model.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype = 'int3': one of auto, float32, bfloat16, float16"):
        LLM(tiny_checkpoint, device="cpu", dtype="int3")
