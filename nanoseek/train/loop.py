"""The one training loop: every stage (pretraining now; SFT, GRPO and distillation later) runs through it.

It owns the optimiser (AdamW), the schedule (warmup, then cosine or warmup-stable-decay), gradient accumulation
and clipping, DeepSeek-V3's balancing (bias update, optional sequence-wise loss), the MTP loss, validation,
`metrics.jsonl`, the progress line and checkpoints. A checkpoint is a complete HF directory with the training
state beside it, written under a temporary name and renamed; `DIR/latest` then points at it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..checkpoint import load_model, save_model
from ..data import Batch, PackedSequences
from ..model import CausalLM, MoE
from ..sizing import parameter_counts
from ..tokenizer import Tokenizer
from .losses import (
    IGNORE,
    add_routed_counts,
    max_violation,
    mtp_loss,
    sequence_balance_loss,
    token_loss_sum,
    update_router_biases,
)

STATE_FILE, OPTIMIZER_FILE = "trainer_state.json", "optimizer.safetensors"
# Dense BF16 peak FLOP/s of GPUs for the cost projection (vendor figures).
GPU_PEAK = {"h800": 989e12, "h100": 989e12, "h200": 989e12, "a100": 312e12, "b200": 2250e12}
# DeepSeek-V3's own utilisation, from Table 1: 6 x 37B x 14.8T FLOPs in 2.788M H800-hours at 989 TFLOP/s.
V3_MFU = 6 * 37e9 * 14.8e12 / (2.788e6 * 3600 * 989e12)


@dataclass
class TrainConfig:
    max_steps: int = 200
    batch_size: int = 8  # sequences per micro-batch per rank
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"  # or "wsd": warmup, stable, then a linear decay over the last decay_fraction
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3  # V3: 0.3, then 0.1 (V3 paper §4.2)
    balance_alpha: float = 0.0  # V3: 0.0001 (V3 paper §4.2); 0 = off
    bias_gamma: float = 0.001  # V3: 0.001 (V3 paper §4.2); 0 = no auxiliary-loss-free update
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    keep: int = 2
    seed: int = 0
    cost_gpu: str = "h800"
    cost_price: float = 2.0  # $ per GPU-hour (the V3 paper's rental assumption)

    def validate(self) -> TrainConfig:
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "save_every", "keep", "eval_every",
                     "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} = {value!r}: must be a positive integer")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} = {getattr(self, name)!r}: must be > 0")
        for name in ("warmup_steps", "weight_decay", "mtp_lambda", "balance_alpha", "bias_gamma", "min_lr_ratio"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} = {getattr(self, name)!r}: must be >= 0")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"--decay-fraction = {self.decay_fraction!r}: must be in [0, 1]")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"--schedule = {self.schedule!r}: must be 'cosine' or 'wsd'")
        if self.cost_gpu not in GPU_PEAK:
            raise ValueError(f"--cost-gpu = {self.cost_gpu!r}: one of {', '.join(GPU_PEAK)}")
        return self

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based `step`."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        floor = self.lr * self.min_lr_ratio
        if self.schedule == "wsd":
            decay_start = int(self.max_steps * (1 - self.decay_fraction))
            if step < decay_start:
                return self.lr
            return floor + (self.lr - floor) * (self.max_steps - step) / max(1, self.max_steps - decay_start)
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def add_train_arguments(parser, **defaults) -> None:
    """One command-line flag per TrainConfig field (--max-steps, --lr, ...), with a stage's own defaults."""
    base = TrainConfig(**defaults)
    for option in fields(TrainConfig):
        if option.name != "betas":
            default = getattr(base, option.name)
            extra = {"choices": list(GPU_PEAK)} if option.name == "cost_gpu" else {}
            parser.add_argument("--" + option.name.replace("_", "-"), type=type(default), default=default, **extra)


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


def train_config_from(args) -> TrainConfig:
    """The TrainConfig the flags of `add_train_arguments` describe, checked; refuses to overwrite a run."""
    out = Path(args.out)
    if not args.resume and (out / "latest").exists():
        raise ValueError(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "betas"}).validate()


class Trainer:
    """Trains `model` on `data`. Under torchrun it runs data-parallel (`parallel`: "ddp", or "fsdp" for FSDP2's
    fully_shard); rank 0 logs and writes. `resume` continues from DIR/latest."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None, data: PackedSequences, config: TrainConfig,
                 out: Path, resume: bool = False, parallel: str = "ddp"):
        self.model, self.tokenizer, self.data, self.config = model, tokenizer, data, config.validate()
        self.out = Path(out)
        self.step = 0
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        state = self._load_weights() if resume else None  # before sharding: every rank loads the full weights
        self.parallel = parallel if self.world > 1 else "none"
        self.module = self._wrap(model)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=config.betas, **({"foreach": True} if self.parallel == "fsdp" else {"fused": True}))
        self.routers = [m for m in model.modules() if isinstance(m, MoE)]
        self.activated = parameter_counts(model.config).activated
        self.peak = _gemm_peak(model.device)
        self.device_type = model.device.type
        if state is not None:
            self._load_state(state)

    def _wrap(self, model: CausalLM) -> torch.nn.Module:
        if self.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in [*model.model.layers, *model.mtp]:
                fully_shard(layer)
            fully_shard(model)
            return model
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            unused = len(model.mtp) > 0 and self.config.mtp_lambda == 0  # MTP weights get no gradient then
            return DistributedDataParallel(model, find_unused_parameters=unused)
        if self.parallel != "none":
            raise ValueError(f"--parallel = {self.parallel!r}: must be 'ddp' or 'fsdp'")
        return model

    # ---- one step --------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        config, model = self.config, self.model
        model.train()
        lr = config.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
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
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
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
        if config.bias_gamma:
            update_router_biases(self.routers, counts, config.bias_gamma)
        self.step += 1
        elapsed = time.perf_counter() - started
        violations = max_violation(counts)
        return {"step": self.step, **totals, "lr": lr, "grad_norm": float(grad_norm.full_tensor() if hasattr(
            grad_norm, "full_tensor") else grad_norm), "tokens": tokens,
                "tokens_per_s": tokens / elapsed, "mfu": 6 * self.activated * tokens / elapsed / self.peak,
                "maxvio": sum(violations) / max(1, len(violations)), "maxvio_max": max(violations, default=0.0)}

    def next_batch(self):
        """This rank's next micro-batch (a stage such as GRPO produces its own: rollouts)."""
        return self.data.next_batch(self.config.batch_size, self.rank, self.world)

    def loss(self, batch: Batch, counts: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict, int]:
        """Next-token CE + lambda * MTP + alpha * sequence balance; adds routed counts to `counts`."""
        config, model = self.config, self.model
        inputs, targets = batch.inputs.to(model.device), batch.targets.to(model.device)
        with_mtp = config.mtp_lambda > 0 and len(model.mtp) > 0
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device_type == "cuda"):
            out = self.module(inputs, mtp=with_mtp, router_stats=True)
        denominator = (targets != IGNORE).sum().clamp_min(1)
        ce = token_loss_sum(out.logits, targets) / denominator
        loss, parts = ce, {"ce": ce.item()}
        if with_mtp:
            extra = mtp_loss(out, targets, denominator)
            loss = loss + config.mtp_lambda * extra
            parts["mtp"] = extra.item()
        if config.balance_alpha:
            balance = sequence_balance_loss(out, inputs.shape[0], model.config.num_experts_per_tok)
            loss = loss + config.balance_alpha * balance
            parts["balance"] = balance.item()
        if counts is not None:
            add_routed_counts(counts, out, batch.real)
        parts["loss"] = loss.item()
        return loss, parts, int(denominator)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        losses = [self.loss(batch)[1]["ce"] for batch in self.data.validation(self.config.batch_size,
                                                                             self.config.eval_batches)]
        return {"val_loss": sum(losses) / len(losses)}

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
                if self.step % config.save_every == 0 or self.step == config.max_steps:
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
    def save(self) -> Path:
        """Write checkpoints/step-N (model, tokenizer, training state) atomically; point `latest` at it.
        Every rank takes part (FSDP gathers the full weights); rank 0 writes."""
        weights, optimizer = self._full_state()
        checkpoints = self.out / "checkpoints"
        final = checkpoints / f"step-{self.step:08d}"
        if self.rank == 0:
            checkpoints.mkdir(parents=True, exist_ok=True)
            for stale in checkpoints.glob(".step-*.tmp-*"):  # left by a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            tmp = checkpoints / f".step-{self.step:08d}.tmp-{os.getpid()}"
            try:
                save_model(weights, tmp)
                if self.tokenizer is not None:
                    self.tokenizer.save(tmp)
                save_file(optimizer, str(tmp / OPTIMIZER_FILE))
                state = {"step": self.step, "data": self.data.state(), "config": asdict(self.config),
                         "rng": torch.get_rng_state().tolist(), "world": self.world, "parallel": self.parallel}
                (tmp / STATE_FILE).write_text(json.dumps(state))
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            link = self.out / f".latest-{os.getpid()}"
            link.unlink(missing_ok=True)
            link.symlink_to(Path("checkpoints") / final.name)
            os.replace(link, self.out / "latest")  # atomic: `latest` is always a complete checkpoint
            for old in sorted(checkpoints.glob("step-*"))[: -self.config.keep]:
                shutil.rmtree(old, ignore_errors=True)
        if self.world > 1:
            dist.barrier()
        return final

    def _full_state(self) -> tuple[CausalLM, dict[str, torch.Tensor]]:
        """(a model holding the full weights, the flat full optimizer state) for writing."""
        if self.parallel != "fsdp":
            return self.model, _flatten_optimizer(self.optimizer.state, self.model)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.model, options=options)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        if self.rank != 0:
            return self.model, {}
        full = CausalLM(self.model.config, num_mtp_modules=len(self.model.mtp))
        full.load_state_dict(weights)
        full.generation_config = self.model.generation_config
        flat = {f"{name}/{key}": value.contiguous() for name, entry in optimizer["state"].items()
                for key, value in entry.items()}
        return full, flat

    def _load_weights(self) -> dict:
        """Check DIR/latest against this run and load its weights into the (unwrapped) model."""
        latest = self.out / "latest"
        if not (latest / STATE_FILE).exists():
            raise ValueError(f"--resume: {latest} holds no training checkpoint")
        saved = load_model(latest, device=self.model.device, dtype=self.model.dtype)
        if saved.config.to_dict() != self.model.config.to_dict() or len(saved.mtp) != len(self.model.mtp):
            differing = sorted(k for k, v in saved.config.to_dict().items()
                               if self.model.config.to_dict().get(k) != v)
            raise ValueError(f"--resume: {latest} is a different model (config fields differ: "
                             f"{', '.join(differing) or 'number of MTP modules'})")
        state = json.loads((latest / STATE_FILE).read_text())
        for key in ("seq_len", "batch_size", "grad_accum", "seed"):
            if state["config"][key] != getattr(self.config, key):
                raise ValueError(f"--resume: {latest} was trained with {key} = {state['config'][key]}, "
                                 f"not {getattr(self.config, key)}")
        if state.get("world", 1) != self.world:
            raise ValueError(f"--resume: {latest} was trained on {state.get('world', 1)} processes, not "
                             f"{self.world} (the data order depends on it)")
        self.model.load_state_dict(saved.state_dict())
        return state

    def _load_state(self, state: dict) -> None:
        """Optimiser, data position, RNG and step from DIR/latest (after wrapping)."""
        flat = load_file(str(self.out / "latest" / OPTIMIZER_FILE))
        if self.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            nested: dict[str, dict[str, torch.Tensor]] = {}
            for key, value in flat.items():
                name, field = key.split("/", 1)
                nested.setdefault(name, {})[field] = value
            groups = [{**{k: v for k, v in g.items() if k != "params"},
                       "params": [n for n, p in self.model.named_parameters() if any(p is q for q in g["params"])]}
                      for g in self.optimizer.param_groups]
            set_optimizer_state_dict(self.model, self.optimizer, {"state": nested, "param_groups": groups},
                                     options=StateDictOptions(full_state_dict=True))
        else:
            _load_optimizer(self.optimizer, self.model, flat)
        self.data.load_state(state["data"])
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
        self.step = state["step"]


def _flatten_optimizer(state: dict, model: CausalLM) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {f"{names[id(param)]}/{key}": value.detach().contiguous().cpu()
            for param, entry in state.items() for key, value in entry.items()}


def _load_optimizer(optimizer: torch.optim.Optimizer, model: CausalLM, flat: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        keys = [k for k in flat if k.startswith(name + "/")]
        if keys:
            optimizer.state[param] = {k.split("/", 1)[1]: flat[k].to(param.device) for k in keys}


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
