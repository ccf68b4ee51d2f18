"""Hugging Face checkpoint files, below any model: safetensors weights (one file, or shards listed in
`model.safetensors.index.json`), `config.json` and `generation_config.json` (transformers'
`modeling_utils.py` conventions; the safetensors format spec).

A model describes its checkpoint as `TensorSlot`s keyed by tensor name (`LanguageModel.checkpoint_slots`);
this module reads and writes the files those names live in. Writing goes to a temporary directory renamed into
place, so an interrupted save never leaves a half-written checkpoint. Only safetensors: nothing is unpickled.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


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
    keep_fp32: bool = False  # saved in fp32 whatever the checkpoint's dtype (a router's correction bias)

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.shape) * (4 if self.keep_fp32 else torch.empty(0, dtype=dtype).element_size())


def param_slot(tensor: Tensor) -> TensorSlot:
    """The slot of a parameter or buffer stored as it is."""
    return TensorSlot(tuple(tensor.shape), lambda: tensor.detach(), lambda t: tensor.data.copy_(t))


# ---- reading ---------------------------------------------------------------------------------
def weights_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint's weight files (in name order): equal for the same weights, byte for byte."""
    digest = hashlib.sha256()
    for file in sorted(set(weight_files(Path(path)).values())):
        with open(file, "rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def weight_files(path: Path) -> dict[str, Path]:
    """Map each tensor name of the checkpoint directory `path` to the file holding it."""
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
        for name in open_safetensors(file).keys():
            files[name] = file
    return files


def open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: cannot read safetensors ({exc}); the file is truncated or corrupt") from exc


def read_tensor(handle, name: str, file: Path) -> Tensor:
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: cannot read tensor {name} ({exc}); the file is truncated or "
                              "corrupt") from exc


def read_generation_config(path: Path) -> dict[str, Any]:
    """`generation_config.json` of the checkpoint directory `path`, or {} when it has none."""
    file = path / GENERATION_CONFIG_FILE
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


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


# ---- writing ---------------------------------------------------------------------------------
def _shard_names(slots: dict[str, TensorSlot], dtype: torch.dtype, limit: int) -> list[list[str]]:
    """Tensor names in checkpoint order, cut into shards of at most `limit` bytes (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, slot in slots.items():
        nbytes = slot.nbytes(dtype)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_weights(slots: dict[str, TensorSlot], directory: Path, dtype: torch.dtype, limit: int) -> None:
    shards = _shard_names(slots, dtype, limit)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = WEIGHTS_FILE if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: slots[n].read().to(device="cpu", dtype=torch.float32 if slots[n].keep_fp32 else dtype)
                   .contiguous() for n in names}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    if len(shards) > 1:
        total = sum(slot.nbytes(dtype) for slot in slots.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_checkpoint(path: str | os.PathLike, slots: dict[str, TensorSlot], config: dict[str, Any],
                     generation: dict[str, Any], dtype: torch.dtype, max_shard_bytes: int | None = None) -> None:
    """Write config.json (with `torch_dtype`), generation_config.json and the weights of `slots` marked
    `saved` (sharded above `max_shard_bytes`) to the directory `path`, atomically.

    Files of an existing directory that a checkpoint does not define (a tokenizer, say) are kept.
    """
    path = Path(path)
    saved = {name: slot for name, slot in slots.items() if slot.saved}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_weights(saved, tmp, dtype, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
        config = {**config, "torch_dtype": str(dtype).removeprefix("torch.")}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
