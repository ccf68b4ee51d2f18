"""Absorbed decode over the latent cache equals the expanded full-sequence forward (V3 paper §2.1.1)."""

from __future__ import annotations

import pytest
import torch
from conftest import nanoseek_model

from nanoseek.model.attention import CacheContext
from nanoseek.sizing import kv_cache_bytes_per_token

TOL = 1e-4
CASES = {"base": {}, "no-q-lora": {"q_lora_rank": None}, "rope-half-split": {"rope_interleave": False},
         "no-yarn": {"rope_scaling": None}}


@pytest.mark.parametrize("case", list(CASES))
def test_token_by_token_absorbed_decode_equals_full_forward(case):
    model = nanoseek_model(**CASES[case])
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(num_slots=2, max_len=48)
    with torch.no_grad():
        full = model(ids)
        for t in range(ids.shape[1]):
            positions = torch.full((2, 1), t)
            step = model(ids[:, t:t + 1], positions, cache)  # one token per row: absorbed by default
            assert (step[:, 0] - full[:, t]).abs().max() <= TOL, f"position {t}"


def test_expanded_prefill_then_absorbed_decode():
    model = nanoseek_model()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(num_slots=1, max_len=64)
    with torch.no_grad():
        full = model(ids)
        prefill = model(ids[:, :25], cache=cache)  # expanded over the cache
        assert (prefill - full[:, :25]).abs().max() <= TOL
        chunk = model(ids[:, 25:31], torch.arange(25, 31)[None], cache, absorbed=True)  # absorbed, 6 at once
        assert (chunk - full[:, 25:31]).abs().max() <= TOL
        for t in range(31, 40):
            step = model(ids[:, t:t + 1], torch.tensor([[t]]), cache)
            assert (step[:, 0] - full[:, t]).abs().max() <= TOL


@pytest.mark.parametrize("slot_a, slot_b", [(3, 1), (1, 2)])  # scattered slots; consecutive ones (a view)
def test_rows_at_different_lengths_in_arbitrary_slots(slot_a, slot_b):
    """A batch whose rows sit in other slots at other positions decodes as each sequence alone would."""
    model = nanoseek_model()
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 128, (1, 30), generator=gen), torch.randint(0, 128, (1, 12), generator=gen)
    cache = model.new_cache(num_slots=4, max_len=32)
    with torch.no_grad():
        full_a, full_b = model(a), model(b)
        model(a[:, :20], cache=cache, slots=torch.tensor([slot_a]))
        model(b[:, :5], cache=cache, slots=torch.tensor([slot_b]))
        for step in range(7):  # a at 20.., b at 5.., decoded together
            ids = torch.tensor([[a[0, 20 + step]], [b[0, 5 + step]]])
            positions = torch.tensor([[20 + step], [5 + step]])
            logits = model(ids, positions, cache, slots=torch.tensor([slot_a, slot_b]))
            assert (logits[0, 0] - full_a[0, 20 + step]).abs().max() <= TOL
            assert (logits[1, 0] - full_b[0, 5 + step]).abs().max() <= TOL


def test_consecutive_slots_are_read_in_place():
    """Rows in slots s..s+B-1 attend over views of the cache: indexing by slot would copy every key of every row
    in every layer at every step (at 32K keys, twice the time of a sparse-attention decode step)."""
    cache = nanoseek_model().new_cache(num_slots=4, max_len=16)
    for slots, in_place in ((torch.tensor([1, 2]), True), (torch.tensor([0]), True), (torch.tensor([2, 0]), False)):
        positions = torch.tensor([[5], [7]])[: len(slots)]
        layer = CacheContext.build(cache, positions, slots).layer(1)
        keys = layer.store(torch.ones(len(slots), 1, cache.data.shape[-1]))
        assert (keys.untyped_storage().data_ptr() == cache.data.untyped_storage().data_ptr()) == in_place
        assert torch.equal(cache.data[1, slots, positions[:, 0]], torch.ones(len(slots), cache.data.shape[-1]))
        cache.data.zero_()


def test_cache_holds_exactly_the_latent_per_token_per_layer():
    model = nanoseek_model()
    config = model.config
    cache = model.new_cache(num_slots=3, max_len=50)
    per_token_values = config.kv_lora_rank + config.qk_rope_head_dim
    assert tuple(cache.data.shape) == (config.num_hidden_layers, 3, 50, per_token_values)
    assert cache.bytes_per_token() == per_token_values * config.num_hidden_layers * 4
    latent, expanded = kv_cache_bytes_per_token(config, 4)
    assert latent == cache.bytes_per_token()
    assert expanded == config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * 3 * 4


def test_cache_overflow_is_an_error():
    model = nanoseek_model()
    cache = model.new_cache(num_slots=1, max_len=8)
    with pytest.raises(ValueError, match="beyond the cache length 8"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[8]]), cache)


def test_default_path_choice_follows_the_cost_of_each_shape():
    from nanoseek.model.transformer import absorbed_is_cheaper

    config = nanoseek_model().config
    assert absorbed_is_cheaper(config, 1, 10) and absorbed_is_cheaper(config, 2, 200)  # decode, verify
    assert not absorbed_is_cheaper(config, 64, 64)  # prefill from an empty cache
