"""Hugging Face checkpoints: load and save DeepSeek-V3 safetensors by tensor name
(DeepSeek-V3's `README_WEIGHTS.md`; transformers' `modeling_deepseek_v3.py`).

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensor names are the checkpoint's (per-expert `experts.{e}.*`, MTP module k
at `model.layers.{num_hidden_layers + k}`); block-FP8 weights are dequantised on load (`README_WEIGHTS.md`:
128x128 blocks, `weight_scale_inv`). Saving
writes the same names, sharded above a size threshold, into a temporary directory renamed into place, so
an interrupted save never leaves a half-written checkpoint. Only safetensors: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import ConfigError, ModelConfig
from .model import CausalLM, MoE
from .model.dense import DENSE_ARCHITECTURES, DenseConfig, DenseLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_LIST_LIMIT = 12


class CheckpointError(ValueError):
    """A checkpoint directory or file is unusable; the message says which file or tensor and why."""


@dataclass
class TensorSlot:
    """One checkpoint tensor: its expected shape and how to read it from / write it into the model."""

    shape: tuple[int, ...]
    read: Callable[[], Tensor]
    write: Callable[[Tensor], None]
    optional: bool = False  # may be absent on load (the MTP copies of the embedding and head)
    saved: bool = True  # written on save (not a tied head)


def _param_slot(tensor: Tensor) -> TensorSlot:
    return TensorSlot(tuple(tensor.shape), lambda: tensor.detach(), lambda t: tensor.data.copy_(t))


def _expert_slots(prefix: str, moe: MoE) -> dict[str, TensorSlot]:
    """Per-expert checkpoint matrices ([out, in], nn.Linear layout) over the stacked right-multiplied ones."""
    gate_up, down = moe.experts.w_gate_up, moe.experts.w_down
    inner = down.shape[1]
    slots = {}
    for e in range(gate_up.shape[0]):
        views = {"gate_proj": gate_up[e, :, :inner], "up_proj": gate_up[e, :, inner:], "down_proj": down[e]}
        for name, view in views.items():
            slots[f"{prefix}experts.{e}.{name}.weight"] = TensorSlot(
                tuple(view.T.shape), lambda v=view: v.detach().T, lambda t, v=view: v.data.copy_(t.T))
    return slots


def _module_slots(prefix: str, module: torch.nn.Module) -> dict[str, TensorSlot]:
    slots: dict[str, TensorSlot] = {}
    experts = set()
    for name, sub in module.named_modules():
        if isinstance(sub, MoE):
            sub_prefix = f"{prefix}{name}." if name else prefix
            slots.update(_expert_slots(sub_prefix, sub))
            experts.add(f"{name}.experts." if name else "experts.")
    for name, tensor in module.state_dict(keep_vars=True).items():  # parameters and persistent buffers
        if not any(name.startswith(e) for e in experts):
            slots[prefix + name] = _param_slot(tensor)
    return slots


def checkpoint_slots(model: CausalLM | DenseLM) -> dict[str, TensorSlot]:
    """Every tensor of the checkpoint format, keyed by its checkpoint name."""
    slots = _module_slots("model.", model.model)
    if isinstance(model, DenseLM):
        head = model.lm_head.weight
        if model.config.tie_word_embeddings:  # one matrix, stored once as the embedding (transformers' rule)
            slots["lm_head.weight"] = TensorSlot(tuple(head.shape), lambda: head.detach(), lambda t: None,
                                                 optional=True, saved=False)
        else:
            slots["lm_head.weight"] = _param_slot(head)
        return slots
    slots.update(_module_slots("lm_head.", model.lm_head))
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    for k, module in enumerate(model.mtp):
        prefix = f"model.layers.{model.config.num_hidden_layers + k}."
        slots.update(_module_slots(prefix, module))
        # The checkpoint stores copies of the shared embedding and head in each MTP layer (`README_WEIGHTS.md`).
        slots[prefix + "embed_tokens.weight"] = TensorSlot(tuple(embed.shape), lambda: embed.detach().clone(),
                                                           lambda t: None, optional=True)
        slots[prefix + "shared_head.head.weight"] = TensorSlot(tuple(head.shape), lambda: head.detach().clone(),
                                                               lambda t: None, optional=True)
    return slots


# ---- reading ---------------------------------------------------------------------------------
def weights_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint's weight files (in name order): equal for the same weights, byte for byte."""
    digest = hashlib.sha256()
    for file in sorted(set(_weight_files(Path(path)).values())):
        with open(file, "rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _weight_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the file holding it."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is a {type(weight_map).__name__}")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a `weight_map` object): "
                                  f"{exc}") from exc
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.exists():
                raise CheckpointError(f"{index} lists shard {file.name}, which is missing from {path}")
        return files
    single = path / WEIGHTS_FILE
    candidates = [single] if single.exists() else sorted(path.glob("*.safetensors"))
    if not candidates:
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE}, {INDEX_FILE} or *.safetensors file; not a checkpoint")
    files = {}
    for file in candidates:
        for name in _open(file).keys():
            files[name] = file
    return files


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: cannot read safetensors ({exc}); the file is truncated or corrupt") from exc


def _mtp_layers_present(names: list[str], config: ModelConfig) -> int:
    return len({_layer_index(n) for n in names if _layer_index(n) >= config.num_hidden_layers})


def dequantize_fp8(weight: Tensor, scale_inv: Tensor, block: tuple[int, int], name: str) -> Tensor:
    """W = W_fp8 * scale_inv[i // block_rows, j // block_cols], with ceil-div blocks whose last one may be
    partial (DeepSeek-V3 `inference/kernel.py` `weight_dequant`; transformers 5.23 infers the block
    size from the scale grid and gets partial blocks wrong)."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale_inv.shape) != grid:
        raise CheckpointError(f"tensor {name}_scale_inv has shape {list(scale_inv.shape)}, expected {list(grid)} "
                              f"for a {list(weight.shape)} weight in {block[0]}x{block[1]} blocks")
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def read_config(file: Path) -> ModelConfig | DenseConfig:
    """The config of a checkpoint: DeepSeek-V3's, or the dense family's (Llama, Qwen2) by `model_type`."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        if isinstance(raw, dict) and raw.get("model_type") in DENSE_ARCHITECTURES:
            return DenseConfig.from_dict(raw)
        return ModelConfig.from_json_file(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc
    except ConfigError as exc:
        raise CheckpointError(f"{file}: {exc}") from exc


def load_model(path: str | os.PathLike, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> CausalLM | DenseLM:
    """Load an HF-format checkpoint directory: DeepSeek-V3, or a Llama / Qwen2 dense model (R1's distilled
    students); fp32 on CPU and bf16 on CUDA unless `dtype` says."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; expected a checkpoint directory with {CONFIG_FILE} "
                              "and safetensors weights")
    if not (path / CONFIG_FILE).exists():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; not a checkpoint directory")
    config = read_config(path / CONFIG_FILE)
    files = _weight_files(path)
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    quantization = getattr(config, "quantization_config", None) or {}
    block = tuple(quantization.get("weight_block_size", (128, 128)))

    with torch.device(device):
        if isinstance(config, DenseConfig):
            model = DenseLM(config)
        else:
            depth = min(_mtp_layers_present(list(files), config), config.num_nextn_predict_layers)
            model = CausalLM(replace(config, quantization_config=None), num_mtp_modules=depth)
    model.to(dtype)
    slots = checkpoint_slots(model)

    handles = {file: _open(file) for file in sorted(set(files.values()))}
    unexpected, mismatched, loaded = [], [], set()
    for name, file in files.items():
        if name.endswith("_scale_inv"):
            if name.removesuffix("_scale_inv") not in files:
                unexpected.append(name)
            continue
        slot = slots.get(name)
        if slot is None:
            unexpected.append(name)
            continue
        tensor = _get(handles[file], name, file)
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = name + "_scale_inv"
            if scale_name not in files:
                raise CheckpointError(f"tensor {name} is FP8 but {scale_name} is missing")
            tensor = dequantize_fp8(tensor, _get(handles[files[scale_name]], scale_name, files[scale_name]),
                                    block, name)
        if tuple(tensor.shape) != slot.shape:
            mismatched.append(f"{name}: checkpoint {list(tensor.shape)}, model {list(slot.shape)}")
            continue
        slot.write(tensor.to(device))
        loaded.add(name)
    missing = [name for name, slot in slots.items() if name not in loaded and not slot.optional]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
        if names:
            shown = ", ".join(names[:_LIST_LIMIT]) + (f", ... ({len(names)} in all)" if len(names) > _LIST_LIMIT
                                                      else "")
            problems.append(f"{len(names)} {label} tensor(s): {shown}")
    if isinstance(model, CausalLM) and any(_layer_index(name) >= config.num_hidden_layers for name in unexpected):
        problems.append(f"tensors under model.layers.{config.num_hidden_layers} and above are MTP modules: "
                        "config.json's num_nextn_predict_layers says how many the model has")
    if problems:
        raise CheckpointError(f"{path}: weights do not match the config: " + "; ".join(problems))
    generation = path / GENERATION_CONFIG_FILE
    if generation.exists():
        try:
            model.generation_config = json.loads(generation.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{generation}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    model.eval()
    return model


def _layer_index(name: str) -> int:
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def _get(handle, name: str, file: Path) -> Tensor:
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: cannot read tensor {name} ({exc}); the file is truncated or "
                              "corrupt") from exc


# ---- writing ---------------------------------------------------------------------------------
def save_model(model: CausalLM | DenseLM, path: str | os.PathLike, dtype: torch.dtype | None = None,
               max_shard_bytes: int | None = None) -> None:
    """Write config.json, generation_config.json and safetensors (sharded above `max_shard_bytes`).

    Files of an existing directory that a checkpoint does not define (a tokenizer, say) are kept.
    """
    path = Path(path)
    dtype = dtype or model.dtype
    limit = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    slots = {name: slot for name, slot in checkpoint_slots(model).items() if slot.saved}

    def out_dtype(name: str) -> torch.dtype:
        return torch.float32 if name.endswith("e_score_correction_bias") else dtype

    shards: list[list[str]] = [[]]
    size = 0
    for name, slot in slots.items():
        nbytes = math.prod(slot.shape) * torch.empty(0, dtype=out_dtype(name)).element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    total = sum(math.prod(s.shape) * torch.empty(0, dtype=out_dtype(n)).element_size() for n, s in slots.items())

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        weight_map = {}
        for i, names in enumerate(shards, start=1):
            file = WEIGHTS_FILE if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: slots[n].read().to(device="cpu", dtype=out_dtype(n)).contiguous() for n in names}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        config = model.config if isinstance(model, DenseLM) else replace(model.config,
                                                                            num_nextn_predict_layers=len(model.mtp))
        config.to_json_file(tmp / CONFIG_FILE, dtype=str(dtype).removeprefix("torch."))
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                      **model.generation_config}
        (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _checkpoint_files(path: Path) -> set[str]:
    """The files of the checkpoint in `path` (others, like an optimizer's safetensors, are not ours)."""
    names = {item.name for item in path.iterdir() if item.is_file() and (
        item.name in (WEIGHTS_FILE, INDEX_FILE, CONFIG_FILE, GENERATION_CONFIG_FILE) or _SHARD.fullmatch(item.name))}
    if INDEX_FILE in names:
        try:
            names |= set(json.loads((path / INDEX_FILE).read_text()).get("weight_map", {}).values())
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    return names


def _replace_dir(new: Path, target: Path) -> None:
    """Move the complete checkpoint in `new` to `target`.

    A new or empty target is replaced by one directory rename. Into an existing directory the files move one
    by one with atomic renames, weights first and config.json last; the old checkpoint's stale shards are
    removed after, and everything else in the directory (a tokenizer, other runs) is left alone.
    """
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        if target.exists():
            target.rmdir()
        new.rename(target)
        return
    if not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory")
    stale = _checkpoint_files(target)
    order = sorted(new.iterdir(), key=lambda item: item.name in (CONFIG_FILE, GENERATION_CONFIG_FILE))
    for item in order:
        os.replace(item, target / item.name)
        stale.discard(item.name)
    for name in stale:
        (target / name).unlink()
    new.rmdir()
