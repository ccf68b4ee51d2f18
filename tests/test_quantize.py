"""Weight-only int8 / int4 inference (`LanguageModel.quantize`, `LLM(quantize=...)`, `--quantize`): the formats
against their definitions, each model against its float twin holding the same dequantised weights, the sizes
`nanoseek info` prints against what a quantised model holds, and the errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import nanoseek_model
from torch import Tensor

import nanoseek
from nanoseek.config import DenseConfig
from nanoseek.model import DenseLM
from nanoseek.model.moe import RoutedExperts
from nanoseek.model.quantized import (
    Int4Linear,
    Int8Experts,
    Int8Linear,
    QuantizedExperts,
    QuantizedLinear,
    quantized_linear,
)
from nanoseek.sizing import weight_bytes

BF16_STEP = 2.0**-8  # relative rounding of a bf16 value


def dequantized(layer: QuantizedLinear) -> Tensor:
    """The [out, in] matrix the kernel multiplies by: its matmul applied to the identity."""
    return layer.matmul(torch.eye(layer.in_features, dtype=torch.bfloat16)).float().T


def test_int8_codes_are_within_half_a_step_of_each_weight_at_any_width():
    torch.manual_seed(0)
    weight = torch.randn(48, 40)  # 40 inputs: not a multiple of the kernel's 16 (padded)
    layer = quantized_linear(weight, None, "int8")
    assert isinstance(layer, Int8Linear)
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    error = (dequantized(layer) - weight).abs()
    assert (error <= 0.5 * step * (1 + 2 * BF16_STEP) + BF16_STEP * weight.abs()).all()
    x = torch.randn(5, 40)  # 4 rows or more took the kernel's blocked path, which crashed on unpadded widths
    reference = x.bfloat16().float() @ dequantized(layer).T
    assert torch.allclose(layer(x), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())


def test_int4_groups_are_within_half_a_step_and_a_flat_group_is_exact():
    torch.manual_seed(0)
    weight = torch.randn(32, 128)
    weight[3, :64] = 0.25  # a group whose min and max are equal
    layer = quantized_linear(weight, None, "int4", group_size=64)
    assert isinstance(layer, Int4Linear)
    groups = weight.view(32, 2, 64)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(64, dim=1)
    deq = dequantized(layer)
    assert torch.isfinite(deq).all() and torch.allclose(deq[3, :64], torch.full((64,), 0.25), rtol=4 * BF16_STEP)
    assert ((deq - weight).abs() <= 0.5 * step * (1 + 4 * BF16_STEP) + 2 * BF16_STEP * weight.abs()).all()


@pytest.mark.parametrize("shape", [(24, 64), (32, 48), (32, 96)])
def test_a_matrix_the_int4_kernel_does_not_take_is_kept_int8(shape):
    layer = quantized_linear(torch.randn(shape), None, "int4", group_size=64)
    assert isinstance(layer, Int8Linear)
    assert isinstance(quantized_linear(torch.randn(32, 128), None, "int4", group_size=64), Int4Linear)


def float_twin(model: nanoseek.LanguageModel, quantized: nanoseek.LanguageModel) -> nanoseek.LanguageModel:
    """`model` with each matrix replaced by the dequantised one its quantised copy multiplies by."""
    twin = copy.deepcopy(model)
    float_modules = dict(twin.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantizedLinear) and "experts.gate_up" not in name and "experts.down" not in name:
                float_modules[name].weight = torch.nn.Parameter(dequantized(module))
            elif isinstance(module, QuantizedExperts):
                experts = float_modules[name]
                experts.w_gate_up.copy_(torch.stack([dequantized(m).T for m in module.gate_up]))
                experts.w_down.copy_(torch.stack([dequantized(m).T for m in module.down]))
            elif isinstance(module, Int8Experts):
                gate_up, down = module.dequantized()
                float_modules[name].w_gate_up.copy_(gate_up)
                float_modules[name].w_down.copy_(down)
    return twin


def dense_model(tied: bool) -> DenseLM:
    torch.manual_seed(0)
    config = DenseConfig(model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tied)
    model = DenseLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.02)  # qwen2's q/k/v biases, non-zero
    return model


@pytest.mark.parametrize("form", ["int8", "int4"])
@pytest.mark.parametrize("family", ["deepseek-v3", "qwen2-tied", "qwen2"])
def test_a_quantised_model_computes_what_its_dequantised_twin_does(family, form):
    model = nanoseek_model(num_nextn_predict_layers=1) if family == "deepseek-v3" else \
        dense_model(tied=family == "qwen2-tied")
    quantized = copy.deepcopy(model).quantize(form)
    assert quantized.weight_format == form
    left = [n for n, m in quantized.named_modules() if isinstance(m, (torch.nn.Linear, RoutedExperts))]
    assert all(n.endswith("kv_b_proj") for n in left)  # every other matrix is quantised
    assert not any(p.requires_grad for p in quantized.parameters())
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = quantized(ids)
        twin = float_twin(model, quantized)(ids)
        original = model(ids)
    # the twin differs only by the bf16 rounding of each quantised matmul's input
    assert (ours - twin).abs().max() < 0.02 * twin.abs().max()
    assert (ours - twin).abs().max() < (ours - original).abs().max()


@pytest.mark.parametrize("form", ["int8", "int4"])
def test_info_sizes_are_what_a_quantised_model_holds(form):
    for model in (nanoseek_model(num_nextn_predict_layers=1), dense_model(tied=True), dense_model(tied=False)):
        main, mtp = weight_bytes(model.config, dtype_bytes=4, quantize=form)
        model.quantize(form)
        held = {t.data_ptr(): (n, t.numel() * t.element_size()) for n, t in model.state_dict().items()}
        assert main == sum(size for name, size in held.values() if not name.startswith("mtp."))
        assert mtp == sum(size for name, size in held.values() if name.startswith("mtp."))


@pytest.mark.parametrize("form", ["int8", "int4"])
def test_quantising_while_loading_gives_the_model_quantised_after_loading(tiny_checkpoint, form):
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        after = nanoseek.load_model(tiny_checkpoint).quantize(form)(ids, mtp=True)
        during = nanoseek.load_model(tiny_checkpoint, quantize=form)
        assert during.weight_format == form
        out = during(ids, mtp=True)
    assert torch.equal(out.logits, after.logits) and torch.equal(out.mtp_logits[0], after.mtp_logits[0])


def test_engine_decode_with_quantised_weights_matches_their_full_forward(tiny_checkpoint):
    """Prefill (expanded attention) then cached decode (absorbed) over int4 weights: the greedy tokens are the
    argmax chain of the same quantised model run over the whole sequence without a cache."""
    llm = nanoseek.LLM(tiny_checkpoint, device="cpu", quantize="int4", max_model_len=64)
    prompt = [5, 17, 3, 60, 2, 9]
    tokens = llm.generate([prompt], nanoseek.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    generated = tokens[0].outputs[0].token_ids
    with torch.no_grad():
        logits = llm.model(torch.tensor([prompt + generated]))[0, len(prompt) - 1: -1]
    assert logits.argmax(-1).tolist() == generated


def test_quantisation_errors_name_the_setting_and_save_writes_nothing(tmp_path):
    model = nanoseek_model()
    with pytest.raises(ValueError, match=r"quantize = 'int3': the weight formats are int8, int4"):
        copy.deepcopy(model).quantize("int3")
    with pytest.raises(ValueError, match=r"group_size = 48: the int4 kernel takes \(32, 64, 128, 256\)"):
        copy.deepcopy(model).quantize("int4", group_size=48)
    with pytest.raises(ValueError, match=r"kernels used are PyTorch's CPU ones and the model is on meta"):
        copy.deepcopy(model).to("meta").quantize("int8")
    model.quantize("int8")
    with pytest.raises(ValueError, match=r"quantize = 'int4': this model's weights are int8 already"):
        model.quantize("int4")
    with pytest.raises(ValueError, match=r"save_pretrained: this model's weights are int8-quantised"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_generate_eval_and_serve_take_quantize(chat_checkpoint):
    run = [sys.executable, "-m", "nanoseek"]
    out = subprocess.run([*run, "generate", "--model", str(chat_checkpoint), "--prompt", "the cat", "--max-tokens",
                          "6", "--temperature", "0", "--quantize", "int4", "--json"],
                         capture_output=True, text=True, check=True)
    assert len(json.loads(out.stdout)["outputs"][0]["token_ids"]) == 6
    bad = subprocess.run([*run, "generate", "--model", str(chat_checkpoint), "--prompt", "x", "--quantize", "int2"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--quantize: invalid choice: 'int2'" in bad.stderr
    import argparse

    from nanoseek.serve import add_arguments
    from nanoseek.serve.app import build_server

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    server = build_server(parser.parse_args(["--model", str(chat_checkpoint), "--quantize", "int8"]))
    assert server.llm.model.weight_format == "int8"
