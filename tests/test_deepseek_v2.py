"""DeepSeek-V2 (`model_type: deepseek_v2`): logit parity with transformers' DeepseekV2ForCausalLM (fp32, eager) in
both directions over a matrix of configs, cached decode, the engine, config.json round trips, the router's
bookkeeping without a correction bias, sizing and the config's error messages."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import perturb, tiny_config

import nanoseek
from nanoseek import LLM, ConfigError, SamplingParams
from nanoseek.checkpoint import CheckpointError
from nanoseek.config import DeepSeekV2Config, ModelConfig, preset
from nanoseek.model import MoE
from nanoseek.sizing import parameter_counts
from nanoseek.train.losses import sequence_balance_loss, update_router_biases

TOL = 1e-4
LITE_YARN = {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
             "original_max_position_embeddings": 16}

# Each case changes the tiny config (q_lora_rank 24, YaRN with original length 16, first_k_dense_replace 1,
# 8 experts in 4 groups, top-3) under device-limited routing keeping 2 groups, gates unscaled.
MATRIX = {
    "group-limited": {},
    "greedy": {"topk_method": "greedy"},
    "greedy-groups-null": {"topk_method": "greedy", "n_group": None, "topk_group": None},  # transformers' defaults
    "v2-scale-16": {"routed_scaling_factor": 16.0},  # DeepSeek-V2's gates
    "no-q-lora": {"q_lora_rank": None},
    "no-yarn": {"rope_scaling": None},
    "no-q-lora-no-yarn": {"q_lora_rank": None, "rope_scaling": None},
    "one-expert-per-group": {"n_group": 8, "topk_group": 3},
    "16-experts-8-groups-keep-3": {"n_routed_experts": 16, "n_group": 8, "topk_group": 3, "num_experts_per_tok": 4},
    "all-moe": {"first_k_dense_replace": 0},
    "attention-bias": {"attention_bias": True},
    # V2-Lite in miniature: no query compression, its YaRN mscale, greedy top-k, two shared experts, scale 1
    "v2-lite-shape": {"q_lora_rank": None, "rope_scaling": LITE_YARN, "topk_method": "greedy", "n_shared_experts": 2},
}


def v2_config(**overrides) -> dict:
    """The tiny config as DeepseekV2Config kwargs: no MTP field (V2 has none), group-limited routing."""
    config = {**tiny_config(), "topk_method": "group_limited_greedy"}
    del config["num_nextn_predict_layers"]
    config.update(overrides)
    return config


@torch.no_grad()
def sharpen_routers(model: torch.nn.Module) -> torch.nn.Module:
    """Perturbed norms (as the V3 tests) and routers 10x sharper: near-uniform softmax scores would make the
    top-k choice hinge on noise-sized differences."""
    perturb(model)
    for name, param in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            param.mul_(10.0)
    return model


def hf_v2(seed: int = 0, **overrides):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV2Config(**v2_config(**overrides), attn_implementation="eager")
    return sharpen_routers(DeepseekV2ForCausalLM(config).eval())


def ours_v2(seed: int = 0, **overrides) -> nanoseek.CausalLM:
    torch.manual_seed(seed)
    return sharpen_routers(nanoseek.CausalLM(DeepSeekV2Config(**v2_config(**overrides))).eval())


def _ids(batch: int = 2, steps: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, steps), generator=torch.Generator().manual_seed(seed))


# ---- parity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(MATRIX))
def test_transformers_checkpoint_loads_with_equal_logits(case, tmp_path):
    hf = hf_v2(**MATRIX[case])
    hf.save_pretrained(tmp_path)
    ours = nanoseek.load_model(tmp_path)
    assert isinstance(ours.config, DeepSeekV2Config) and not len(ours.mtp)
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        assert (ours(ids) - expected).abs().max() <= TOL
        assert (ours(ids, absorbed=True) - expected).abs().max() <= TOL


@pytest.mark.parametrize("case", ["group-limited", "greedy", "v2-scale-16", "v2-lite-shape", "attention-bias"])
def test_nanoseek_checkpoint_loads_in_transformers(case, tmp_path):
    from transformers import DeepseekV2ForCausalLM

    ours = ours_v2(**MATRIX[case])
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == ["DeepseekV2ForCausalLM"] and written["model_type"] == "deepseek_v2"
    assert "rope_interleave" not in written and "num_nextn_predict_layers" not in written  # V3's fields
    hf, info = DeepseekV2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = _ids()
    with torch.no_grad():
        assert (hf.eval()(ids).logits - ours(ids)).abs().max() <= TOL


def test_the_matrix_can_see_the_routing(tmp_path):
    """Guard against a matrix blind to the router: the same weights routed greedily, device-limited or with
    scaled gates give logits far apart."""
    ids = _ids()
    with torch.no_grad():
        logits = {name: hf_v2(**MATRIX[name])(ids).logits for name in ("group-limited", "greedy", "v2-scale-16")}
    assert (logits["group-limited"] - logits["greedy"]).abs().max() > 10 * TOL
    assert (logits["group-limited"] - logits["v2-scale-16"]).abs().max() > 10 * TOL


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_router_selects_and_weighs_as_transformers(method):
    """The router alone, on hidden states that make the choice decisive: same experts, same gates."""
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    overrides = {"topk_method": method, "routed_scaling_factor": 16.0}
    reference = DeepseekV2TopkRouter(DeepseekV2Config(**v2_config(**overrides)))
    ours = ours_v2(**overrides).model.layers[1].mlp.gate
    with torch.no_grad():
        reference.weight.copy_(ours.weight)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    weights, indices, scores = ours(x)
    _, hf_weights, hf_indices = reference(x)
    order, hf_order = indices.argsort(dim=-1), hf_indices.argsort(dim=-1)
    assert torch.equal(indices.gather(1, order), hf_indices.gather(1, hf_order))
    assert (weights.gather(1, order) - hf_weights.gather(1, hf_order)).abs().max() <= 1e-6
    assert torch.allclose(scores.sum(dim=-1), torch.ones(64))  # softmax affinities


@pytest.mark.parametrize("case", ["group-limited", "v2-lite-shape"])
def test_token_by_token_decode_over_the_latent_cache_equals_the_full_forward(case, tmp_path):
    hf = hf_v2(**MATRIX[case])
    hf.save_pretrained(tmp_path)
    ours = nanoseek.load_model(tmp_path)
    ids = _ids(steps=20)
    cache = ours.new_cache(num_slots=2, max_len=20)
    with torch.no_grad():
        full = hf(ids).logits
        for t in range(ids.shape[1]):
            step = ours(ids[:, t:t + 1], torch.full((2, 1), t), cache)  # one token per row: absorbed
            assert (step[:, 0] - full[:, t]).abs().max() <= TOL, f"position {t}"


def test_engine_generates_greedily_as_transformers(tmp_path):
    hf = hf_v2(**MATRIX["v2-lite-shape"])
    hf.save_pretrained(tmp_path)
    llm = LLM(tmp_path, max_num_seqs=2)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 128, (n,), generator=gen).tolist() for n in (9, 4)]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outputs, strict=True):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == expected


# ---- no correction bias ------------------------------------------------------------------------------
def test_routers_have_no_correction_bias_and_training_still_balances():
    model = ours_v2()
    assert not any("e_score_correction_bias" in name for name in model.state_dict())
    assert not any("e_score_correction_bias" in name for name in model.checkpoint_slots())
    out = model(_ids(steps=16), router_stats=True)
    assert len(out.router_stats) == 2 and torch.allclose(out.router_stats[0].scores.sum(-1), torch.ones(32))
    balance = sequence_balance_loss(out, 2, model.config.num_experts_per_tok)  # V2 paper §2.2.3's form
    (out.logits.float().mean() + balance).backward()
    gate = model.model.layers[1].mlp.gate
    assert torch.isfinite(balance) and gate.weight.grad.abs().sum() > 0
    routers = [m for m in model.modules() if isinstance(m, MoE)]
    update_router_biases(routers, [s.counts for s in out.router_stats], 0.001)  # nothing to update: skipped
    assert gate.e_score_correction_bias is None
    model.to(torch.bfloat16)
    assert model(_ids(steps=8)).dtype == torch.bfloat16


def test_a_checkpoint_with_correction_biases_is_not_a_v2_checkpoint(tmp_path):
    from conftest import nanoseek_model

    nanoseek_model().save_pretrained(tmp_path)  # DeepSeek-V3 weights, biases included
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_interleave", "num_nextn_predict_layers"):
        config.pop(key)
    config.update(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], scoring_func="softmax",
                  topk_method="group_limited_greedy", norm_topk_prob=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): model\.layers\.1\.mlp\.gate\."
                                              r"e_score_correction_bias"):
        nanoseek.load_model(tmp_path)


# ---- config.json -------------------------------------------------------------------------------------
def test_transformers_written_config_round_trips(tmp_path):
    from transformers import DeepseekV2Config

    DeepseekV2Config(**v2_config(routed_scaling_factor=16.0)).save_pretrained(tmp_path)  # 5.x rope_parameters
    config = ModelConfig.from_json_file(tmp_path / "config.json")
    assert isinstance(config, DeepSeekV2Config) and config.architecture == "DeepseekV2ForCausalLM"
    assert config.topk_method == "group_limited_greedy" and config.scoring_func == "softmax"
    assert config.routed_scaling_factor == 16.0 and not config.norm_topk_prob and not config.correction_bias
    assert config.rope_scaling["factor"] == 40 and config.num_nextn_predict_layers == 0
    config.to_json_file(tmp_path / "ours.json")
    again = DeepseekV2Config.from_json_file(tmp_path / "ours.json")
    assert again.topk_method == "group_limited_greedy" and again.n_group == 4 and again.topk_group == 2
    assert again.routed_scaling_factor == 16.0 and again.q_lora_rank == 24 and again.num_experts_per_tok == 3
    assert again.rope_parameters["rope_type"] == "yarn" and again.rope_parameters["factor"] == 40
    assert ModelConfig.from_json_file(tmp_path / "ours.json") == config


def test_defaults_are_transformers_defaults():
    """A config.json that leaves a field out means transformers' DeepseekV2Config default, not V3's."""
    from transformers import DeepseekV2Config

    reference = DeepseekV2Config().to_dict()
    ours = DeepSeekV2Config()
    shared = [f.name for f in dataclasses.fields(ours) if f.name in reference and f.name != "rope_scaling"]
    assert len(shared) > 30
    assert {n: getattr(ours, n) for n in shared} == {n: reference[n] for n in shared}
    minimal = ModelConfig.from_dict({"model_type": "deepseek_v2", "num_experts_per_tok": 6})
    assert minimal.first_k_dense_replace == 0 and minimal.routed_scaling_factor == 1.0
    assert minimal.topk_method == "greedy" and minimal.moe_intermediate_size == 1407


def test_hub_config_keys_survive_a_round_trip():
    hub = {**preset("deepseek-v2-lite").to_dict(), "aux_loss_alpha": 0.001, "seq_aux": True, "moe_layer_freq": 1,
           "pretraining_tp": 1, "ep_size": 1, "torch_dtype": "bfloat16"}
    config = ModelConfig.from_dict(hub)
    assert config == dataclasses.replace(preset("deepseek-v2-lite"), extra=config.extra)
    out = config.to_dict()
    assert out["aux_loss_alpha"] == 0.001 and out["seq_aux"] is True and out["topk_method"] == "greedy"


def test_v2_lite_preset_is_transformers_shape():
    """Every parameter of transformers' DeepseekV2ForCausalLM built from the preset (on the meta device, nothing
    allocated) is counted: 15.7B."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    config = preset("deepseek-v2-lite")
    assert isinstance(config, DeepSeekV2Config) and config.q_lora_rank is None and config.n_routed_experts == 64
    with torch.device("meta"):
        reference = DeepseekV2ForCausalLM(DeepseekV2Config.from_dict(config.to_dict()))
    assert parameter_counts(config).total == sum(p.numel() for p in reference.parameters())


def test_parameter_counts_match_the_model_without_router_biases():
    model = ours_v2()
    assert parameter_counts(model.config).total == sum(p.numel() for p in model.parameters())


INVALID = [
    ({"topk_method": "noaux_tc"}, "`topk_method` = 'noaux_tc': must be 'greedy' or 'group_limited_greedy' for "
                                  "deepseek_v2"),
    ({"topk_method": "top2"}, "`topk_method` = 'top2': must be 'greedy' or 'group_limited_greedy'"),
    ({"scoring_func": "sigmoid"}, "`scoring_func` = 'sigmoid': must be 'softmax' for deepseek_v2"),
    ({"norm_topk_prob": True}, "`norm_topk_prob` = True: must be false for deepseek_v2"),
    ({"num_nextn_predict_layers": 1}, "`num_nextn_predict_layers` = 1: must be 0: DeepSeek-V2 has no multi-token"),
    ({"rope_interleave": False}, "`rope_interleave` = False: must be true"),
    ({"mlp_bias": True}, "`mlp_bias` = True: must be false"),
    ({"num_experts_per_tok": None}, "`num_experts_per_tok` = None: must be a positive integer"),
    ({"n_group": None}, "`n_group` = None: must be a positive integer"),
    ({"n_group": 3}, "`n_routed_experts` = 8: must be divisible by n_group (3)"),
    ({"topk_group": 1}, "`num_experts_per_tok` = 3: must be <= topk_group * n_routed_experts / n_group = 2"),
    ({"topk_method": "greedy", "n_group": 0}, "`n_group` = 0: must be a positive integer or null"),
    ({"topk_method": "greedy", "num_experts_per_tok": 9}, "`num_experts_per_tok` = 9: must be <= n_routed_experts"),
]


@pytest.mark.parametrize(("change", "message"), INVALID, ids=[str(c) for c, _ in INVALID])
def test_invalid_v2_config_names_field_and_rule(change, message):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({"model_type": "deepseek_v2", **v2_config(), **change})
    assert message in str(info.value)
