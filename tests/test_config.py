"""ModelConfig: transformers' DeepseekV3Config JSON in both rope forms, validation messages, presets."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from nanoseek import ConfigError, ModelConfig, preset
from nanoseek.config import PRESETS

YARN = {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 16}


def raw_config(**changes) -> dict:
    return {"model_type": "deepseek_v3", **tiny_config(), **changes}


def test_transformers_written_config_round_trips(tmp_path):
    from transformers import DeepseekV3Config

    DeepseekV3Config(**tiny_config()).save_pretrained(tmp_path)  # written in the 5.x rope_parameters form
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written
    config = ModelConfig.from_json_file(tmp_path / "config.json")
    assert config.rope_scaling["type"] == "yarn" and config.rope_scaling["factor"] == 40
    assert config.rope_scaling["original_max_position_embeddings"] == 16
    assert config.q_lora_rank == 24 and config.v_head_dim == 12
    config.to_json_file(tmp_path / "ours.json")
    again = DeepseekV3Config.from_json_file(tmp_path / "ours.json")  # our legacy form reads back in 5.x
    assert again.rope_parameters["rope_type"] == "yarn" and again.rope_parameters["factor"] == 40
    assert again.rope_parameters["mscale_all_dim"] == 1.0 and again.rope_parameters["rope_theta"] == 10000.0
    assert ModelConfig.from_json_file(tmp_path / "ours.json") == config


def test_legacy_rope_scaling_and_hub_keys():
    hub = raw_config(rope_scaling=YARN, rope_theta=50000, topk_method="noaux_tc", scoring_func="sigmoid",
                     moe_layer_freq=1, num_nextn_predict_layers=1, quantization_config=None)
    config = ModelConfig.from_dict(hub)
    assert config.rope_theta == 50000.0 and config.rope_scaling == YARN
    out = config.to_dict()
    assert out["topk_method"] == "noaux_tc" and out["scoring_func"] == "sigmoid"
    assert out["rope_scaling"] == YARN and "rope_parameters" not in out


def test_default_rope_means_no_scaling():
    default = {"rope_type": "default", "rope_theta": 1e4}
    assert ModelConfig.from_dict(raw_config(rope_scaling=None, rope_parameters=default)).rope_scaling is None
    assert ModelConfig.from_dict(raw_config(rope_scaling=None)).rope_scaling is None


def test_legacy_rope_scaling_wins_over_rope_parameters():
    # transformers reads `rope_scaling or rope_parameters`
    config = ModelConfig.from_dict(raw_config(rope_scaling=YARN, rope_parameters={"rope_type": "default"}))
    assert config.rope_scaling == YARN


def test_yarn_fallbacks_follow_transformers():
    partial = {"type": "yarn", "factor": 4, "beta_fast": None, "mscale": 1.0, "mscale_all_dim": 1.0}
    config = ModelConfig.from_dict(raw_config(rope_scaling=partial))
    assert config.rope_scaling["original_max_position_embeddings"] == 640  # max_position_embeddings


def test_quantization_config_is_kept():
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    assert ModelConfig.from_dict(raw_config(quantization_config=qc)).to_dict()["quantization_config"] == qc


INVALID = [
    ({"num_key_value_heads": 2}, "`num_key_value_heads` = 2: must equal num_attention_heads (4)"),
    ({"qk_rope_head_dim": 7}, "`qk_rope_head_dim` = 7: must be even"),
    ({"n_routed_experts": 10}, "`n_routed_experts` = 10: must be divisible by n_group (4)"),
    ({"n_group": 8}, "`n_group` = 8: must leave at least 2 experts per group"),
    ({"topk_group": 5}, "`topk_group` = 5: must be <= n_group (4)"),
    ({"num_experts_per_tok": 5}, "`num_experts_per_tok` = 5: must be <= topk_group * n_routed_experts / n_group = 4"),
    ({"moe_layer_freq": 2}, "`moe_layer_freq` = 2: must be 1"),
    ({"hidden_size": 0}, "`hidden_size` = 0: must be a positive integer"),
    ({"q_lora_rank": -1}, "`q_lora_rank` = -1: must be a positive integer or null"),
    ({"first_k_dense_replace": 4}, "`first_k_dense_replace` = 4: must be between 0 and num_hidden_layers (3)"),
    ({"hidden_act": "gelu"}, "`hidden_act` = 'gelu': must be 'silu'"),
    ({"tie_word_embeddings": True}, "`tie_word_embeddings` = True: must be false"),
    ({"scoring_func": "softmax"}, "`scoring_func` = 'softmax': must be 'sigmoid'"),
    ({"topk_method": "greedy"}, "`topk_method` = 'greedy': must be 'noaux_tc'"),
    ({"topk_method": "group_limited_greedy"}, "'group_limited_greedy': must be 'noaux_tc'"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "`rope_scaling.type` = 'linear': only 'yarn'"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": -1}},
     "`rope_scaling.original_max_position_embeddings` = -1"),
    ({"rope_scaling": "yarn"}, "`rope_scaling` = 'yarn': must be an object or null"),
    ({"quantization_config": {"quant_method": "awq"}}, "`quantization_config.quant_method` = 'awq'"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}},
     "`quantization_config.weight_block_size` = [128]"),
    ({"model_type": "llama"}, "`model_type` = 'llama' is not supported; supported: deepseek_v3"),
    ({"rms_norm_eps": "1e-6"}, "`rms_norm_eps` = '1e-6': must be a number"),
    ({"num_nextn_predict_layers": None}, "`num_nextn_predict_layers` = None: must be an integer"),
    ({"first_k_dense_replace": None}, "`first_k_dense_replace` = None: must be an integer"),
    ({"rope_interleave": "false"}, "`rope_interleave` = 'false': must be true or false"),
    ({"routed_scaling_factor": "2.5"}, "`routed_scaling_factor` = '2.5': must be a number"),
    ({"n_shared_experts": 0}, "`n_shared_experts` = 0: must be >= 1"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, None]}},
     "`quantization_config.weight_block_size` = [128, None]"),
]


@pytest.mark.parametrize(("change", "message"), INVALID, ids=[next(iter(c)) for c, _ in INVALID])
def test_invalid_config_names_field_and_rule(change, message):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(raw_config(**change))
    assert message in str(info.value)


def test_model_type_picks_the_deepseek_generation():
    from nanoseek.config import DeepSeekV2Config, config_from_dict

    v2 = {"model_type": "deepseek_v2", "num_experts_per_tok": 2}
    assert type(ModelConfig.from_dict(v2)) is DeepSeekV2Config and type(config_from_dict(v2)) is DeepSeekV2Config
    assert type(ModelConfig.from_dict(raw_config())) is ModelConfig
    with pytest.raises(ConfigError, match="`model_type` = 'deepseek_v4' is not supported; supported: deepseek_v3, "
                                          "deepseek_v2"):
        ModelConfig.from_dict(raw_config(model_type="deepseek_v4"))
    with pytest.raises(ConfigError, match="`model_type` = 'deepseek_v3' is not supported; supported: deepseek_v2"):
        DeepSeekV2Config.from_dict(raw_config())


def test_v3_config_names_its_routing():
    out = preset("tiny").to_dict()
    assert out["architectures"] == ["DeepseekV3ForCausalLM"] and out["model_type"] == "deepseek_v3"
    assert out["scoring_func"] == "sigmoid" and out["topk_method"] == "noaux_tc" and preset("tiny").correction_bias
    assert out["rope_interleave"] is True and out["num_nextn_predict_layers"] == 1


def test_non_utf8_config_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(ConfigError, match="config.json: not UTF-8 text"):
        ModelConfig.from_json_file(path)


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "model_type": "deepseek_v3",\n  "hidden_size": ,\n}')
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON \(line 3"):
        ModelConfig.from_json_file(path)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid(name):
    assert preset(name).num_attention_heads == preset(name).num_key_value_heads


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; presets: tiny, micro, nano, small"):
        preset("huge")
