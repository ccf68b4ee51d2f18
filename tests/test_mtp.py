"""Multi-Token Prediction modules (V3 paper §2.2): checkpoint layout, logits against transformers' MtpModel."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

import nanoseek


def test_checkpoint_layout_of_the_mtp_module(tiny_checkpoint):
    tensors = load_file(tiny_checkpoint / "model.safetensors")
    layer = "model.layers.3."  # MTP module 1 of a 3-layer model
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                "shared_head.head.weight", "embed_tokens.weight", "mlp.gate.e_score_correction_bias",
                "mlp.experts.7.down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"):
        assert layer + key in tensors, key
    assert tensors[layer + "eh_proj.weight"].shape == (64, 128)
    assert torch.equal(tensors[layer + "embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert torch.equal(tensors[layer + "shared_head.head.weight"], tensors["lm_head.weight"])
    assert not any(k.startswith("model.layers.4.") for k in tensors)


def test_mtp_logits_match_transformers_mtp_model(tiny_checkpoint):
    from transformers import DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    ours = nanoseek.load_model(tiny_checkpoint)
    assert len(ours.mtp) == 1
    hf = DeepseekV3ForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()
    # transformers only looks for MTP weights at the literal layer 61 of V3; point it at layer 3.
    hf._keys_to_ignore_on_load_unexpected = [r"model\.layers\.3.*"]
    hf_mtp = MtpModel.from_pretrained(hf).eval()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = ours(ids, mtp=True)
        hidden = hf(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
        positions = torch.arange(1, 24).expand(2, -1)
        h = hf_mtp.forward_layer(0, hidden[:, :-1], positions, None, input_ids=ids[:, 1:])
        expected = hf_mtp._project_to_logits(h)
    assert out.mtp_logits[0].shape == (2, 23, 128)
    assert (out.mtp_logits[0] - expected).abs().max() <= 1e-4


def test_mtp_weights_survive_a_round_trip(tiny_checkpoint, tmp_path):
    model = nanoseek.load_model(tiny_checkpoint)
    model.save_pretrained(tmp_path)
    before, after = load_file(tiny_checkpoint / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_checkpoint_without_mtp_weights_loads_without_mtp(tmp_path):
    from conftest import hf_model

    hf_model(num_nextn_predict_layers=1).save_pretrained(tmp_path)  # transformers writes no MTP weights
    model = nanoseek.load_model(tmp_path)
    assert len(model.mtp) == 0
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 128)


def test_sequences_shorter_than_the_mtp_depth():
    from conftest import nanoseek_model

    model = nanoseek_model(num_nextn_predict_layers=2)
    out = model(torch.zeros(2, 1, dtype=torch.long), mtp=True)
    assert out.logits.shape == (2, 1, 128) and [t.shape for t in out.mtp_logits] == [(2, 0, 128)] * 2
    out = model(torch.zeros(1, 2, dtype=torch.long), mtp=True)
    assert [t.shape for t in out.mtp_logits] == [(1, 1, 128), (1, 0, 128)]
