"""Checkpoint directories: sharding, atomic saves, and an error that names the problem for each bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import nanoseek_model
from safetensors.torch import load_file, save_file

import nanoseek
import nanoseek.hf_files
from nanoseek import CheckpointError
from nanoseek.checkpoint import INDEX_FILE


def _rewrite(path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_sharded_save_loads_in_nanoseek_and_transformers(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    model = nanoseek_model()
    model.save_pretrained(tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 128, (1, 16))
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = model(ids)
        assert (nanoseek.load_model(tmp_path)(ids) - expected).abs().max() <= 1e-5
        assert (hf(ids).logits - expected).abs().max() <= 1e-4


def test_save_into_existing_directory_keeps_other_files_and_drops_stale_shards(tmp_path):
    model = nanoseek_model()
    model.save_pretrained(tmp_path, max_shard_bytes=100_000)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "runs").mkdir()
    save_file({"step": torch.zeros(1)}, tmp_path / "optimizer.safetensors")  # not part of the checkpoint
    model.save_pretrained(tmp_path)  # now a single file: the old shards must go
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "runs",
                     "optimizer.safetensors"}
    assert nanoseek.load_model(tmp_path) is not None


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = nanoseek_model()
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nanoseek.hf_files, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="missing: not a directory"):
        nanoseek.load_model(tmp_path / "missing")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json; not a checkpoint directory"):
        nanoseek.load_model(tmp_path)


def test_directory_without_weights(tiny_checkpoint):
    (tiny_checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model.safetensors, .*; not a checkpoint"):
        nanoseek.load_model(tiny_checkpoint)


def test_unsupported_model_type_lists_supported(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["model_type"] = "mixtral"
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="`model_type` = 'mixtral' is not supported; supported: deepseek_v"):
        nanoseek.load_model(tiny_checkpoint)


def test_invalid_config_in_checkpoint_names_file_and_field(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["num_key_value_heads"] = 1
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: config field `num_key_value_heads` = 1"):
        nanoseek.load_model(tiny_checkpoint)


def test_missing_tensor_is_named(tiny_checkpoint):
    _rewrite(tiny_checkpoint, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): model.layers.2.mlp.experts.5.up_proj.weight"):
        nanoseek.load_model(tiny_checkpoint)


def test_unexpected_tensor_is_named(tiny_checkpoint):
    _rewrite(tiny_checkpoint, lambda t: t.update({"model.layers.0.self_attn.rotary.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\): model.layers.0.self_attn.rotary.weight"):
        nanoseek.load_model(tiny_checkpoint)


def test_misshaped_tensor_is_named(tiny_checkpoint):
    _rewrite(tiny_checkpoint, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"1 mis-shaped tensor\(s\): model.norm.weight: checkpoint \[65\], "
                                              r"model \[64\]"):
        nanoseek.load_model(tiny_checkpoint)


def test_truncated_file_is_named(tiny_checkpoint):
    weights = tiny_checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read safetensors .* truncated or corrupt"):
        nanoseek.load_model(tiny_checkpoint)


def test_corrupt_file_is_named(tiny_checkpoint):
    (tiny_checkpoint / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read safetensors .* truncated or corrupt"):
        nanoseek.load_model(tiny_checkpoint)


def test_index_naming_a_missing_shard(tmp_path):
    nanoseek_model().save_pretrained(tmp_path, max_shard_bytes=100_000)
    (tmp_path / "model-00002-of-00003.safetensors").unlink(missing_ok=True)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    total = int(shards[0].split("-of-")[1].split(".")[0])
    victim = f"model-{2:05d}-of-{total:05d}.safetensors"
    (tmp_path / victim).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=f"lists shard {victim}, which is missing"):
        nanoseek.load_model(tmp_path)


def test_corrupt_index(tmp_path):
    nanoseek_model().save_pretrained(tmp_path, max_shard_bytes=100_000)
    (tmp_path / INDEX_FILE).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        nanoseek.load_model(tmp_path)


def test_loads_a_copy_without_generation_config(tiny_checkpoint, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, target)
    (target / "generation_config.json").unlink()
    assert nanoseek.load_model(target).generation_config == {}
