"""The CPU engine's decode-time layout (`model/layout.py`): the same products from [in, out] matrices, the
checkpoint names and values unchanged, and a model handed to the engine left as it is."""

from __future__ import annotations

import torch
from conftest import nanoseek_model
from safetensors.torch import load_file

import nanoseek
from nanoseek.model.layout import RightMultiplied


def test_the_engine_multiplies_right_and_saves_the_same_checkpoint(tiny_checkpoint, tmp_path):
    llm = nanoseek.LLM(tiny_checkpoint, device="cpu", max_model_len=64)
    converted = [name for name, m in llm.model.named_modules() if isinstance(m, RightMultiplied)]
    linear = [name for name, m in llm.model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert converted and all(name.endswith("kv_b_proj") for name in linear)
    reference = nanoseek.load_model(tiny_checkpoint)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(llm.model(ids), reference(ids), atol=1e-5, rtol=1e-5)
    llm.model.save_pretrained(tmp_path / "again")
    before = load_file(tiny_checkpoint / "model.safetensors")
    after = load_file(tmp_path / "again" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_model_handed_to_the_engine_keeps_its_layers():
    model = nanoseek_model()
    nanoseek.LLM(model, device="cpu", max_model_len=64)
    assert not any(isinstance(m, RightMultiplied) for m in model.modules())


def test_quantising_an_engine_model_quantises_every_matrix(tiny_checkpoint):
    from nanoseek.model.quantized import QuantizedLinear

    llm = nanoseek.LLM(tiny_checkpoint, device="cpu", max_model_len=64)
    llm.model.quantize("int8")
    assert not any(isinstance(m, RightMultiplied) for m in llm.model.modules())
    assert any(isinstance(m, QuantizedLinear) for m in llm.model.modules())
