"""The training loop's checkpoints: one directory per save, `checkpoints/step-N`, written under a temporary name
and renamed once complete, `DIR/latest` pointing at the newest, those beyond the newest `keep` removed.

A step directory holds `trainer_state.json` (step, data position, RNG, the run's settings) and
- the full model as an HF directory (config.json, safetensors, tokenizer) with `optimizer.safetensors`:
  one process and DDP, whose every rank holds the whole model; or
- `dcp/`, the model and optimizer as `torch.distributed.checkpoint` shards, each rank writing its own part and
  nothing gathered: FSDP. The last checkpoint of such a run, and any the run is asked to export, hold the full
  HF directory as well, so that `DIR/latest` of a finished run loads like any other.
DCP reshards on load: shards written by N ranks resume on M (one process included), FSDP or not.
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..model import LanguageModel, build_model

# torch.distributed.checkpoint is imported where it is used: it adds seconds to the start of every command,
# and only FSDP runs and DCP resumes need it.
STATE_FILE, OPTIMIZER_FILE, SHARDS_DIR = "trainer_state.json", "optimizer.safetensors", "dcp"


def is_sharded(checkpoint: Path) -> bool:
    """Whether a step directory resumes from DCP shards (an FSDP run's) rather than its full weights."""
    return (checkpoint / SHARDS_DIR).is_dir()


def write_step(out: Path, step: int, keep: int, write: Callable[[Path], None]) -> Path:
    """Create out/checkpoints/step-N: every rank calls `write(directory)` on one temporary directory, which is
    renamed only once all ranks are done, so a run killed on the way leaves no checkpoint `--resume` would
    pick (only a temporary directory, removed at the next save). Then `latest` points at it and checkpoints
    beyond the newest `keep` go."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    checkpoints = out / "checkpoints"
    final = checkpoints / f"step-{step:08d}"
    temporary = checkpoints / f".step-{step:08d}.tmp-{os.getpid()}"
    if rank == 0:
        checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints.glob(".step-*.tmp-*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        temporary.mkdir()
    temporary = _rank0_value(temporary)  # rank 0's name (its pid): one directory for every rank's files
    try:
        write(temporary)
        _barrier()  # every rank's files are complete before the rename makes them a checkpoint
        if rank == 0:
            if final.exists():
                shutil.rmtree(final)
            temporary.rename(final)
    except BaseException:
        if rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    if rank == 0:
        link = out / f".latest-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(Path("checkpoints") / final.name)
        os.replace(link, out / "latest")  # atomic: `latest` is always a complete checkpoint
        for old in sorted(checkpoints.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _rank0_value(value: Path) -> Path:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---- sharded (DCP) ----------------------------------------------------------------------------------------
def save_shards(model: LanguageModel, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Each rank writes its own shards of the model and optimizer state into `directory`; every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)


def load_shards(model: LanguageModel, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Fill `model` and `optimizer` (sharded or whole) from DCP shards written by any number of ranks; every rank
    calls it. Without a process group the one process reads every shard itself."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    groups = copy.deepcopy(optimizer_state["param_groups"])  # dcp.load writes into these dicts in place
    state = {"model": model_state, "optimizer": optimizer_state}
    no_dist = not dist.is_initialized()
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the intent then
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": state["model"]}, checkpoint_id=directory, no_dist=no_dist)  # every weight, strictly
        # AdamW keeps no state for a parameter that never had a gradient (MTP modules at --mtp-lambda 0), while
        # the fresh optimizer has one for each: those keep their fresh (zero) moments, as they would have
        dcp.load({"optimizer": state["optimizer"]}, checkpoint_id=directory, no_dist=no_dist,
                 planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    # this run's hyperparameters and AdamW implementation (fused or foreach) stay, as on the other resume paths
    state["optimizer"]["param_groups"] = groups
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def gathered_model(model: LanguageModel) -> LanguageModel | None:
    """Rank 0: a fresh model of `model`'s family holding the full weights of the FSDP-sharded `model`, gathered to
    CPU; None on the other ranks. Every rank calls it (it is a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if dist.get_rank() != 0:
        return None
    with torch.random.fork_rng(devices=[]):  # a fresh model draws initial weights: keep the run's random stream
        full = build_model(model.config, num_mtp_modules=len(model.mtp))
    full.load_state_dict(weights)
    full.generation_config = model.generation_config
    return full


# ---- full (one process, DDP) ------------------------------------------------------------------------------
def flat_optimizer_state(optimizer: torch.optim.Optimizer, model: LanguageModel) -> dict[str, torch.Tensor]:
    """The optimizer state as safetensors entries `<parameter name>/<state key>`."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {f"{names[id(param)]}/{key}": value.detach().contiguous().cpu()
            for param, entry in optimizer.state.items() for key, value in entry.items()}


def load_flat_optimizer_state(optimizer: torch.optim.Optimizer, model: LanguageModel, flat: dict[str, torch.Tensor],
                              fsdp: bool) -> None:
    """Load `flat_optimizer_state`'s entries into `optimizer`, keeping its parameter groups; under FSDP each rank
    keeps its own shard of every entry."""
    if not fsdp:
        for name, param in model.named_parameters():
            keys = [k for k in flat if k.startswith(name + "/")]
            if keys:
                optimizer.state[param] = {k.split("/", 1)[1]: flat[k].to(param.device) for k in keys}
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    nested: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name, field = key.split("/", 1)
        nested.setdefault(name, {})[field] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [n for n, p in model.named_parameters() if any(p is q for q in g["params"])]}
              for g in optimizer.param_groups]
    set_optimizer_state_dict(model, optimizer, {"state": nested, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
