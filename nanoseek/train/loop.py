"""The one training loop: every stage (pretraining now; SFT, GRPO and distillation later) runs through it.

It owns the optimiser (AdamW), the schedule (warmup, then cosine or warmup-stable-decay), gradient accumulation
and clipping, DeepSeek-V3's balancing (bias update, optional sequence-wise loss), the MTP loss, validation,
`metrics.jsonl`, the progress line and checkpoints (`checkpointing`): a complete HF directory with the training
state beside it, or under FSDP each rank's shards (the full HF directory at the end of the run and on request),
written under a temporary name and renamed; `DIR/latest` then points at it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..checkpoint import load_model, save_model
from ..config import config_from_dict
from ..data import Batch, PackedSequences
from ..model import LanguageModel, MoE
from ..sizing import parameter_counts
from ..tokenizer import Tokenizer
from .checkpointing import (
    OPTIMIZER_FILE,
    SHARDS_DIR,
    STATE_FILE,
    flat_optimizer_state,
    gathered_model,
    is_sharded,
    load_flat_optimizer_state,
    load_shards,
    save_shards,
    write_step,
)
from .config import GPU_PEAK, V3_MFU, TrainConfig
from .losses import (
    IGNORE,
    add_routed_counts,
    max_violation,
    mtp_loss,
    sequence_balance_loss,
    token_loss_sum,
    update_router_biases,
)


def init_distributed(device: str | None) -> tuple[int, torch.device]:
    """Under torchrun: join the process group (gloo on CPU, NCCL on GPU); returns (rank, device)."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, torch.device(device or ("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), torch.device(f"cuda:{local}" if cuda else "cpu")


def run_distributed(body, args, *extra):
    """Call body(args, *extra, rank, device) in one process or, under torchrun, in each rank's process group
    (left cleanly whatever happens)."""
    rank, device = init_distributed(args.device)
    try:
        return body(args, *extra, rank, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    """Trains `model` on `data`. Under torchrun it runs data-parallel (`parallel`: "ddp", or "fsdp" for FSDP2's
    fully_shard); rank 0 logs and writes. `resume` continues from DIR/latest. Under FSDP, checkpoints are each
    rank's shards; the last one, and every `export_every` steps one, holds the full HF directory too."""

    # The data's position is one count over all processes, so a run may resume on another process count (with
    # the same global batch); a stage whose position is per process (GRPO's prompts) says False.
    data_position_is_global = True

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer | None, data: PackedSequences, config: TrainConfig,
                 out: Path, resume: bool = False, parallel: str = "ddp", export_every: int = 0):
        if export_every < 0:
            raise ValueError(f"--export-every = {export_every}: must be >= 0 (0: at the end of the run only)")
        if config.balance_alpha and not any(isinstance(m, MoE) for m in model.modules()):
            raise ValueError(f"--balance-alpha = {config.balance_alpha}: this model has no router to balance")
        self.indexed = model.config.index_cache_dim > 0  # DeepSeek-V3.2: sparse attention, trained with its loss
        if config.dsa_warmup_steps and not self.indexed:
            raise ValueError(f"--dsa-warmup-steps = {config.dsa_warmup_steps}: this model has no sparse-attention "
                             "indexer to warm up (a DeepSeek-V3 model gets one from `nanoseek pretrain --init "
                             "CHECKPOINT --index-topk K`)")
        self.model, self.tokenizer, self.data, self.config = model, tokenizer, data, config.validate()
        self.out, self.export_every = Path(out), export_every
        self.step = 0
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        state = self._load_weights() if resume else None  # before sharding: every rank loads the full weights
        self.parallel = parallel if self.world > 1 else "none"
        if self.parallel == "fsdp" and config.dsa_warmup_steps:
            raise ValueError("--dsa-warmup-steps with --parallel fsdp: FSDP2 runs its backward hooks on layer outputs "
                             "that need a gradient, and in the warm-up only the indexers do (use --parallel ddp)")
        self.module = self._wrap(model)
        self.optimizer = torch.optim.AdamW(
            _parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
            **({"foreach": True} if self.parallel == "fsdp" else {"fused": True}))
        self.routers = [m for m in model.modules() if isinstance(m, MoE)]
        self.activated = parameter_counts(model.config).activated
        self.peak = _gemm_peak(model.device)
        self.device_type = model.device.type
        if state is not None:
            self._load_state(state)

    def _wrap(self, model: LanguageModel) -> torch.nn.Module:
        if self.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in [*model.model.layers, *model.mtp]:
                fully_shard(layer)
            fully_shard(model)
            return model
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # MTP weights get no gradient without their loss, the model's none in the indexers' warm-up, and the
            # indexers none in a stage that leaves their loss out (GRPO's)
            unused = (len(model.mtp) > 0 and self.config.mtp_lambda == 0) or self.indexed
            return DistributedDataParallel(model, find_unused_parameters=unused)
        if self.parallel != "none":
            raise ValueError(f"--parallel = {self.parallel!r}: must be 'ddp' or 'fsdp'")
        return model

    # ---- one step --------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        config, model = self.config, self.model
        model.train()
        lr, warming = config.lr_at(self.step), self.step < config.dsa_warmup_steps
        _freeze_all_but_indexers(model, warming)
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0 if warming and not group["indexer"] else lr
        counts = [torch.zeros(r.experts.w_gate_up.shape[0], device=model.device) for r in self.routers]
        totals: dict[str, float] = {}
        tokens = 0
        started = time.perf_counter()
        for _ in range(config.grad_accum):
            batch = self.next_batch()
            loss, parts, used = self.loss(batch, counts)
            (loss / config.grad_accum).backward()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value / config.grad_accum
            tokens += used
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:  # routed counts summed across ranks (V3 §2.1.2: the load of the whole batch), mean losses
            flat = torch.cat(counts) if counts else torch.zeros(0, device=model.device)
            dist.all_reduce(flat)
            counts = list(flat.split([c.numel() for c in counts]))
            losses = torch.tensor([totals[k] for k in totals], device=model.device)
            dist.all_reduce(losses)
            totals = dict(zip(totals, (losses / self.world).tolist(), strict=True))
            tokens *= self.world
        if config.bias_gamma and not warming:  # the warm-up changes nothing but the indexers
            update_router_biases(self.routers, counts, config.bias_gamma)
        self.step += 1
        elapsed = time.perf_counter() - started
        violations = max_violation(counts)
        return {"step": self.step, **totals, "lr": lr, "grad_norm": float(grad_norm.full_tensor() if hasattr(
            grad_norm, "full_tensor") else grad_norm), "tokens": tokens,
                "tokens_per_s": tokens / elapsed, "mfu": 6 * self.activated * tokens / elapsed / self.peak,
                "maxvio": sum(violations) / max(1, len(violations)), "maxvio_max": max(violations, default=0.0)}

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the gradient norm to `grad_clip`; the indexers' apart from the rest, whose losses are apart (the
        indexers learn only from theirs), so that neither scales the other's step. Returns the rest's norm (the
        indexers' in the warm-up, where the rest has none)."""
        named = list(self.model.named_parameters())
        indexers = [p for name, p in named if ".indexer." in name]
        others = [p for name, p in named if ".indexer." not in name]
        clip = self.config.grad_clip
        if not indexers:
            return torch.nn.utils.clip_grad_norm_(others, clip)
        index_norm = torch.nn.utils.clip_grad_norm_(indexers, clip)
        if self.step < self.config.dsa_warmup_steps:
            return index_norm
        return torch.nn.utils.clip_grad_norm_(others, clip)

    def next_batch(self):
        """This rank's next micro-batch (a stage such as GRPO produces its own: rollouts)."""
        return self.data.next_batch(self.config.batch_size, self.rank, self.world)

    def loss(self, batch: Batch, counts: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict, int]:
        """Next-token CE + lambda * MTP + alpha * sequence balance (+ a V3.2 model's indexer loss, the mean over its
        layers); adds routed counts to `counts`."""
        config, model = self.config, self.model
        inputs, targets = batch.inputs.to(model.device), batch.targets.to(model.device)
        with_mtp = config.mtp_lambda > 0 and len(model.mtp) > 0
        dsa = {"dsa": "dense" if self.step < config.dsa_warmup_steps else "sparse"} if self.indexed else {}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device_type == "cuda"):
            out = self.module(inputs, mtp=with_mtp, router_stats=True, **dsa)
        denominator = (targets != IGNORE).sum().clamp_min(1)
        ce = token_loss_sum(out.logits, targets) / denominator
        loss, parts = ce, {"ce": ce.item()}
        if with_mtp:
            extra = mtp_loss(out, targets, denominator)
            loss = loss + config.mtp_lambda * extra
            parts["mtp"] = extra.item()
        if config.balance_alpha:  # refused for a model without routers (__init__)
            balance = sequence_balance_loss(out, inputs.shape[0], model.config.num_experts_per_tok)
            loss = loss + config.balance_alpha * balance
            parts["balance"] = balance.item()
        if out.indexer_stats:  # its gradient reaches the indexers only, the others' never reach them
            index = torch.stack([s.loss for s in out.indexer_stats]).mean()
            loss = loss + index
            parts["index_loss"] = index.item()
            parts["index_recall"] = torch.stack([s.recall for s in out.indexer_stats]).mean().item()
        if counts is not None:
            add_routed_counts(counts, out, batch.real)
        parts["loss"] = loss.item()
        return loss, parts, int(denominator)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        parts = [self.loss(batch)[1] for batch in self.data.validation(self.config.batch_size,
                                                                      self.config.eval_batches)]
        metrics = {"val_loss": sum(p["ce"] for p in parts) / len(parts)}
        recalls = [p["index_recall"] for p in parts if "index_recall" in p]  # a stage's own loss may leave it out
        if recalls:
            metrics["val_index_recall"] = sum(recalls) / len(recalls)
        return metrics

    # ---- the run ---------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        config = self.config
        metrics_file = self.out / "metrics.jsonl"
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(metrics_file, self.step)
        start_step, started = self.step, time.perf_counter()
        last: dict[str, float] = {}
        with open(metrics_file if self.rank == 0 else os.devnull, "a") as log:
            while self.step < config.max_steps:
                last = self.train_step()
                if self.step % config.eval_every == 0 or self.step == config.max_steps:
                    last.update(self.evaluate())
                log.write(json.dumps(last) + "\n")
                log.flush()
                if self.rank == 0:
                    self._progress(last, start_step, started)
                if self._saves_now():
                    self.save()
        if self.rank == 0:
            print(file=sys.stderr)
        return last

    def _progress(self, metrics: dict, start_step: int, started: float) -> None:
        done = self.step - start_step
        eta = (time.perf_counter() - started) / done * (self.config.max_steps - self.step)
        width = 24
        filled = int(width * self.step / self.config.max_steps)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] step {self.step}/{self.config.max_steps} "
                f"loss {metrics['loss']:.3f} | {metrics['tokens_per_s']:.0f} tok/s | MFU {100 * metrics['mfu']:.0f}% "
                f"| ETA {int(eta // 60)}m{int(eta % 60):02d}s")
        if "val_loss" in metrics:
            line += f" | val {metrics['val_loss']:.3f}"
        end = "\r" if sys.stderr.isatty() and self.step < self.config.max_steps else "\n"
        print(line, end=end, file=sys.stderr, flush=True)

    def cost_line(self, tokens: int, seconds: float) -> str:
        """What the same run would cost on a GPU, with the arithmetic of V3's Table 1."""
        flops = 6 * self.activated * tokens
        hours = flops / (GPU_PEAK[self.config.cost_gpu] * V3_MFU) / 3600
        return (f"cost: {tokens:,} tokens x 6 x {self.activated / 1e6:.1f}M activated parameters = {flops:.3g} FLOPs; "
                f"on {self.config.cost_gpu.upper()} at V3's {100 * V3_MFU:.0f}% utilisation: {hours:.3g} GPU-hours, "
                f"${hours * self.config.cost_price:.3g} at ${self.config.cost_price}/GPU-hour (this run: "
                f"{seconds / 60:.1f} min here)")

    # ---- checkpoints -----------------------------------------------------------------------
    def _saves_now(self) -> bool:
        """Every `save_every` steps, and at every export."""
        return self.step % self.config.save_every == 0 or self._exports_now()

    def _exports_now(self) -> bool:
        """Whether this step's FSDP checkpoint holds the full HF directory too: at the end of the run (the next
        stage reads DIR/latest) and every `export_every` steps."""
        return self.step == self.config.max_steps or (self.export_every > 0 and self.step % self.export_every == 0)

    def save(self) -> Path:
        """Write checkpoints/step-N atomically and point `latest` at it; every rank takes part. FSDP ranks write
        their own shards, and gather the full model to rank 0 only when `_exports_now`."""
        if self.parallel != "fsdp":
            exported: LanguageModel | None = self.model
        else:
            exported = gathered_model(self.model) if self._exports_now() else None
        return write_step(self.out, self.step, self.config.keep, lambda directory: self._write(directory, exported))

    def _write(self, directory: Path, exported: LanguageModel | None) -> None:
        """This rank's files of a checkpoint: its DCP shards under FSDP; on rank 0 the rest."""
        sharded = self.parallel == "fsdp"
        if sharded:
            save_shards(self.model, self.optimizer, directory / SHARDS_DIR)
        if self.rank != 0:
            return
        if exported is not None:
            save_model(exported, directory)
        if self.tokenizer is not None:
            self.tokenizer.save(directory)
        if not sharded:
            save_file(flat_optimizer_state(self.optimizer, self.model), str(directory / OPTIMIZER_FILE))
        (directory / STATE_FILE).write_text(json.dumps(self._training_state()))

    def _training_state(self) -> dict:
        state = {"step": self.step, "data": self.data.state(), "config": asdict(self.config),
                 "rng": torch.get_rng_state().tolist(), "world": self.world, "parallel": self.parallel}
        if self.parallel == "fsdp":  # shards have no config.json beside them: what `--resume` checks against
            state["model"] = {"config": self.model.config.to_dict(), "mtp_modules": len(self.model.mtp)}
        return state

    def _load_weights(self) -> dict:
        """Check DIR/latest against this run and load its full weights into the (unwrapped) model; DCP shards are
        loaded after wrapping, by `_load_state`."""
        latest = self.out / "latest"
        if not (latest / STATE_FILE).exists():
            raise ValueError(f"--resume: {latest} holds no training checkpoint")
        state = json.loads((latest / STATE_FILE).read_text())
        if is_sharded(latest):
            self._check_resumable(latest, state, config_from_dict(state["model"]["config"]).to_dict(),
                                  state["model"]["mtp_modules"])
        else:
            saved = load_model(latest, device=self.model.device, dtype=self.model.dtype)
            self._check_resumable(latest, state, saved.config.to_dict(), len(saved.mtp))
            self.model.load_state_dict(saved.state_dict())
        return state

    def _check_resumable(self, latest: Path, state: dict, config: dict, mtp_modules: int) -> None:
        """ValueError saying what differs when DIR/latest holds another model or another data order."""
        ours = self.model.config.to_dict()
        if config != ours or mtp_modules != len(self.model.mtp):
            differing = sorted(k for k, v in config.items() if ours.get(k) != v)
            raise ValueError(f"--resume: {latest} is a different model (config fields differ: "
                             f"{', '.join(differing) or 'number of MTP modules'})")
        for key in ("seq_len", "grad_accum", "seed"):
            if state["config"][key] != getattr(self.config, key):
                raise ValueError(f"--resume: {latest} was trained with {key} = {state['config'][key]}, "
                                 f"not {getattr(self.config, key)}")
        world, batch_size = state.get("world", 1), state["config"]["batch_size"]
        if world != self.world and not self.data_position_is_global:
            raise ValueError(f"--resume: {latest} was trained on {world} process(es), not {self.world} (this "
                             "stage's data position is kept per process)")
        if world * batch_size != self.world * self.config.batch_size:  # any split of the same rows resumes
            raise ValueError(f"--resume: {latest} was trained on {world} process(es) x batch_size {batch_size}, "
                             f"not {self.world} x {self.config.batch_size} (the data order follows the sequences "
                             "per micro-batch of all processes together)")

    def _load_state(self, state: dict) -> None:
        """Optimiser (and from DCP shards the weights too), data position, RNG and step from DIR/latest (after
        wrapping)."""
        latest = self.out / "latest"
        if is_sharded(latest):
            load_shards(self.model, self.optimizer, latest / SHARDS_DIR)
        else:
            load_flat_optimizer_state(self.optimizer, self.model, load_file(str(latest / OPTIMIZER_FILE)),
                                      fsdp=self.parallel == "fsdp")
        self.data.load_state(state["data"])
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
        self.step = state["step"]


def _parameter_groups(model: LanguageModel, weight_decay: float) -> list[dict]:
    """AdamW's groups: matrices decayed, vectors not; the lightning indexers' apart (`indexer`: True), for the
    DSA warm-up that trains them alone."""
    groups = []
    for indexer in (False, True):
        chosen = [p for name, p in model.named_parameters() if (".indexer." in name) == indexer]
        groups += [{"params": [p for p in chosen if p.ndim >= 2], "weight_decay": weight_decay, "indexer": indexer},
                   {"params": [p for p in chosen if p.ndim < 2], "weight_decay": 0.0, "indexer": indexer}]
    return [g for g in groups if g["params"]]


def _freeze_all_but_indexers(model: LanguageModel, frozen: bool) -> None:
    """In the DSA warm-up only the indexers learn (V3.2-Exp report §2.1.1): the rest builds no graph."""
    for name, param in model.named_parameters():
        param.requires_grad_(not frozen or ".indexer." in name)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past `step` (from a run that was killed after its last checkpoint)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def _gemm_peak(device: torch.device) -> float:
    """FLOP/s of a large square matmul on this device, the denominator of MFU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(1024, 1024, device=device, dtype=dtype)
    a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(8):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 8 * 2 * 1024**3 / (time.perf_counter() - start)
