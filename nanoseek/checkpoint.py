"""Load and save Hugging Face checkpoint directories of any model family (DeepSeek-V3's `README_WEIGHTS.md`;
transformers' `modeling_deepseek_v3.py`, `modeling_deepseek_v2.py`, `modeling_llama.py`, `modeling_qwen2.py`).

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`; the config's `model_type` picks the family, whose `checkpoint_slots` name every
tensor. Block-FP8 weights are dequantised on load (`README_WEIGHTS.md`: 128x128 blocks, `weight_scale_inv`).
The files themselves are read and written by `hf_files`; a llama.cpp GGUF file is read by `gguf_files` and fills
the same slots.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from .config import ConfigError, DenseConfig, ModelConfig, config_from_dict
from .config.base import read_json_object
from .gguf_files import GGUF_SUFFIX, is_gguf, read_gguf, read_gguf_tokenizer
from .hf_files import (
    CONFIG_FILE,
    INDEX_FILE,
    CheckpointError,
    dequantize_fp8,
    open_safetensors,
    read_generation_config,
    read_tensor,
    weight_files,
    weights_sha256,
)
from .model import LanguageModel, build_model
from .model.quantized import quantize_model
from .tokenizer import Tokenizer

__all__ = ["CheckpointError", "INDEX_FILE", "load_model", "load_tokenizer", "read_config", "save_model",
           "weights_sha256"]
_LIST_LIMIT = 12
FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def read_config(file: Path) -> ModelConfig | DenseConfig:
    """The config of a checkpoint: DeepSeek-V3's or V2's, or the dense family's (Llama, Qwen2) by `model_type`."""
    try:
        raw = read_json_object(file)
    except ConfigError as exc:  # the message names the file
        raise CheckpointError(str(exc)) from exc
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise CheckpointError(f"{file}: {exc}") from exc


def _empty_model(config: ModelConfig | DenseConfig, names: list[str]) -> LanguageModel:
    """The config's model, with as many MTP modules as the checkpoint has weights for (at most the config's)."""
    if isinstance(config, DenseConfig):
        return build_model(config)
    present = len({_layer_index(n) for n in names if _layer_index(n) >= config.num_hidden_layers})
    depth = min(present, config.num_nextn_predict_layers)
    return build_model(replace(config, quantization_config=None), num_mtp_modules=depth)


def load_model(path: str | os.PathLike, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, quantize: str | None = None) -> LanguageModel:
    """Load an HF-format checkpoint directory: DeepSeek-V3 or V2, or a Llama / Qwen2 dense model (R1's distilled
    students), or a GGUF file (`x.gguf`: llama, qwen2, deepseek2; dequantised by `gguf_files`); fp32 on CPU and
    bf16 on CUDA unless `dtype` says. With `quantize` ("int8" or "int4") each layer's matrices are quantised as
    soon as the layer is read (`LanguageModel.quantize`), so that the float model is never whole in memory."""
    path = Path(path)
    if is_gguf(path):
        return _load_gguf(path, device, dtype, quantize)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; expected a checkpoint directory with {CONFIG_FILE} "
                              f"and safetensors weights, or a {GGUF_SUFFIX} file")
    if not (path / CONFIG_FILE).exists():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; not a checkpoint directory")
    config = read_config(path / CONFIG_FILE)
    files = weight_files(path)
    model = _new_model(config, list(files), device, dtype)
    _fill(model, files, path, config, quantize)
    model.generation_config = read_generation_config(path)
    return model.eval()


def _new_model(config: ModelConfig | DenseConfig, names: list[str], device: torch.device | str | None,
               dtype: torch.dtype | None) -> LanguageModel:
    """The model with uninitialised weights, every one of which the checkpoint fills: built on the meta device,
    then given empty storage, so that no memory is written twice (nor at all, for matrices quantised on load)."""
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = _empty_model(config, names)
    model = model.to(dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32))
    with torch.device(device):
        model.rotary = type(model.rotary)(config)  # RoPE frequencies: computed, not loaded
    model = model.to_empty(device=device)
    model.tie_weights()
    return model


def _load_gguf(path: Path, device: torch.device | str | None, dtype: torch.dtype | None,
               quantize: str | None) -> LanguageModel:
    """A GGUF file (llama, qwen2 or deepseek2), its tensors dequantised and copied into the same slots a
    checkpoint directory fills (`gguf_files.read_gguf`); the file's sampling defaults as generation_config."""
    contents = read_gguf(path, tokenizer=False)
    model = _new_model(contents.config, list(contents.tensors), device, dtype)
    _fill_slots(model, list(contents.tensors), contents.tensors.__getitem__, path, contents.config,
                mtp_source="the file's nextn_predict_layers", quantize=quantize)
    model.generation_config = contents.generation
    return model.eval()


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer of a checkpoint: a directory's tokenizer.json, or a GGUF file's metadata; None if it has none."""
    return read_gguf_tokenizer(path) if is_gguf(path) else Tokenizer.from_dir(path)


def _fill(model: LanguageModel, files: dict[str, Path], path: Path, config: ModelConfig | DenseConfig,
          quantize: str | None) -> None:
    """Copy every checkpoint tensor into the model's slot for it; CheckpointError listing what is missing,
    unexpected or mis-shaped."""
    quantization = getattr(config, "quantization_config", None) or {}
    block = tuple(quantization.get("weight_block_size", (128, 128)))
    handles = {file: open_safetensors(file) for file in sorted(set(files.values()))}

    def read(name: str) -> Tensor:
        tensor = read_tensor(handles[files[name]], name, files[name])
        return _dequantized(tensor, name, files, handles, block) if tensor.dtype in FP8_TYPES else tensor

    scales = [name for name in files if name.endswith("_scale_inv")]  # read with their weights
    orphans = [name for name in scales if name.removesuffix("_scale_inv") not in files]
    _fill_slots(model, [name for name in files if not name.endswith("_scale_inv")], read, path, config, orphans,
                quantize=quantize)


def _fill_slots(model: LanguageModel, names: list[str], read: Callable[[str], Tensor], path: Path,
                config: ModelConfig | DenseConfig, unexpected: list[str] | None = None,
                mtp_source: str = "config.json's num_nextn_predict_layers", quantize: str | None = None) -> None:
    """Copy each named tensor (`read(name)`) into the model's slot for it, a layer at a time, quantising each
    layer once it is complete when `quantize` says; CheckpointError listing what is missing, unexpected or
    mis-shaped. Shared by checkpoint directories and GGUF files."""
    slots = model.checkpoint_slots()
    required = {name for name, slot in slots.items() if not slot.optional}
    unexpected, mismatched, loaded = list(unexpected or []), [], set()
    # the layers in order (embedding, norm and head, index -1, first), each quantised once it is complete
    for layer, layer_names in itertools.groupby(sorted(names, key=_layer_index), key=_layer_index):
        for name in layer_names:
            slot = slots.pop(name, None)  # dropped once written: a slot keeps its float tensor alive
            if slot is None:
                unexpected.append(name)
                continue
            tensor = read(name)
            if tuple(tensor.shape) != slot.shape:
                mismatched.append(f"{name}: checkpoint {list(tensor.shape)}, model {list(slot.shape)}")
                continue
            slot.write(tensor.to(model.device))
            loaded.add(name)
        if quantize and layer >= 0:
            _quantize_layer(model, layer, quantize)
    missing = sorted(required - loaded)
    problems = [_listed(label, names) for label, names in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)) if names]
    if isinstance(config, ModelConfig) and any(_layer_index(name) >= config.num_hidden_layers for name in unexpected):
        problems.append(f"tensors under model.layers.{config.num_hidden_layers} and above are MTP modules: "
                        f"{mtp_source} says how many the model has")
    if problems:
        raise CheckpointError(f"{path}: weights do not match the config: " + "; ".join(problems))
    if quantize:
        model.quantize(quantize)  # the head and whatever lies outside the layers


def _quantize_layer(model: LanguageModel, layer: int, quantize: str) -> None:
    """Quantise checkpoint layer `layer`: a decoder layer, or past them an MTP module."""
    layers = model.model.layers
    if layer < len(layers):
        quantize_model(layers[layer], quantize)
    elif layer - len(layers) < len(model.mtp):
        quantize_model(model.mtp[layer - len(layers)], quantize)


def _dequantized(tensor: Tensor, name: str, files: dict[str, Path], handles: dict, block: tuple[int, int]) -> Tensor:
    scale_name = name + "_scale_inv"
    if scale_name not in files:
        raise CheckpointError(f"tensor {name} is FP8 but {scale_name} is missing")
    scale = read_tensor(handles[files[scale_name]], scale_name, files[scale_name])
    return dequantize_fp8(tensor, scale, block, name)


def _listed(label: str, names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT]) + (f", ... ({len(names)} in all)" if len(names) > _LIST_LIMIT else "")
    return f"{len(names)} {label} tensor(s): {shown}"


def _layer_index(name: str) -> int:
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def save_model(model: LanguageModel, path: str | os.PathLike, dtype: torch.dtype | None = None,
               max_shard_bytes: int | None = None) -> None:
    """Write config.json, generation_config.json and safetensors (`LanguageModel.save_pretrained`)."""
    model.save_pretrained(path, dtype=dtype, max_shard_bytes=max_shard_bytes)
