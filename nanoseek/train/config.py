"""TrainConfig: the settings of the one training loop, shared by every stage, and their flags."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..flags import add_flags, settings_field, settings_from

# Dense BF16 peak FLOP/s of GPUs for the cost projection (vendor figures).
GPU_PEAK = {"h800": 989e12, "h100": 989e12, "h200": 989e12, "a100": 312e12, "b200": 2250e12}
# DeepSeek-V3's own utilisation, from Table 1: 6 x 37B x 14.8T FLOPs in 2.788M H800-hours at 989 TFLOP/s.
V3_MFU = 6 * 37e9 * 14.8e12 / (2.788e6 * 3600 * 989e12)
# Fields a stage may fix, mapped to (value, why its flag is refused).
Fixed = Mapping[str, tuple[Any, str]]


@dataclass
class TrainConfig:
    max_steps: int = settings_field(200, "optimizer steps")
    batch_size: int = settings_field(8, "sequences per micro-batch per rank")
    grad_accum: int = settings_field(1, "micro-batches per optimizer step")
    seq_len: int = settings_field(256, "tokens per training sequence")
    lr: float = settings_field(3e-3, "peak learning rate")
    min_lr_ratio: float = settings_field(0.1, "final learning rate as a share of the peak")
    warmup_steps: int = settings_field(20, "linear warmup steps")
    schedule: str = settings_field("cosine", "cosine, or wsd: warmup, stable, then a linear decay over the last "
                                   "--decay-fraction", choices=("cosine", "wsd"))
    decay_fraction: float = settings_field(0.2, "share of the steps that decay, with --schedule wsd")
    weight_decay: float = settings_field(0.1, "AdamW weight decay of the matrices")
    betas: tuple[float, float] = settings_field((0.9, 0.95), "AdamW betas")
    grad_clip: float = settings_field(1.0, "gradient norm clip")
    mtp_lambda: float = settings_field(0.3, "MTP loss weight (V3 paper §4.2: 0.3, then 0.1)")
    balance_alpha: float = settings_field(0.0, "sequence-wise balance loss weight (V3 paper §4.2: 0.0001; 0 = off)")
    bias_gamma: float = settings_field(0.001, "auxiliary-loss-free router bias update speed (V3 paper §4.2: "
                                       "0.001; 0 = off)")
    dsa_warmup_steps: int = settings_field(0, "DeepSeek-V3.2 models: the first steps are the dense warm-up, "
                                           "training only the lightning indexer, on the main attention's "
                                           "distribution; the steps after it train with sparse attention "
                                           "(V3.2-Exp report §2.1.1: 1,000 warm-up steps)")
    dsa_warmup_lr: float = settings_field(1e-3, "the indexer's learning rate in the dense warm-up (V3.2-Exp "
                                          "report: 1e-3); the schedule of --lr starts after it")
    eval_every: int = settings_field(50, "steps between validations")
    eval_batches: int = settings_field(4, "validation batches")
    save_every: int = settings_field(50, "steps between checkpoints")
    keep: int = settings_field(2, "checkpoints kept")
    seed: int = settings_field(0, "seed of the weights and the data order")
    cost_gpu: str = settings_field("h800", "GPU of the cost projection", choices=tuple(GPU_PEAK))
    cost_price: float = settings_field(2.0, "$ per GPU-hour of the cost projection (the V3 paper's rental price)")

    def validate(self) -> TrainConfig:
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "save_every", "keep", "eval_every",
                     "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} = {value!r}: must be a positive integer")
        for name in ("lr", "grad_clip", "dsa_warmup_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} = {getattr(self, name)!r}: must be > 0")
        for name in ("warmup_steps", "weight_decay", "mtp_lambda", "balance_alpha", "bias_gamma", "min_lr_ratio",
                     "dsa_warmup_steps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} = {getattr(self, name)!r}: must be >= 0")
        if self.dsa_warmup_steps > self.max_steps:
            raise ValueError(f"--dsa-warmup-steps = {self.dsa_warmup_steps}: more than --max-steps "
                             f"({self.max_steps}), which counts the warm-up")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"--decay-fraction = {self.decay_fraction!r}: must be in [0, 1]")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"--schedule = {self.schedule!r}: must be 'cosine' or 'wsd'")
        if self.cost_gpu not in GPU_PEAK:
            raise ValueError(f"--cost-gpu = {self.cost_gpu!r}: one of {', '.join(GPU_PEAK)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"--betas = {self.betas!r}: two numbers in [0, 1)")
        self.betas = tuple(self.betas)
        return self

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based `step`: `dsa_warmup_lr` (the indexer's) through the DSA warm-up, then the
        schedule over the steps after it."""
        if step < self.dsa_warmup_steps:
            return self.dsa_warmup_lr
        step, steps = step - self.dsa_warmup_steps, self.max_steps - self.dsa_warmup_steps
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        floor = self.lr * self.min_lr_ratio
        if self.schedule == "wsd":
            decay_start = int(steps * (1 - self.decay_fraction))
            if step < decay_start:
                return self.lr
            return floor + (self.lr - floor) * (steps - step) / max(1, steps - decay_start)
        progress = (step - self.warmup_steps) / max(1, steps - self.warmup_steps)
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# What the stages after pretraining fix: only pretraining projects a GPU cost and warms an indexer up.
PRETRAIN_ONLY: dict[str, tuple[Any, str]] = {
    "cost_gpu": ("h800", "only `nanoseek pretrain` projects a GPU cost"),
    "cost_price": (2.0, "only `nanoseek pretrain` projects a GPU cost"),
    "dsa_warmup_steps": (0, "the indexer's dense warm-up is a stage of `nanoseek pretrain`"),
    "dsa_warmup_lr": (1e-3, "the indexer's dense warm-up is a stage of `nanoseek pretrain`"),
}


def add_run_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """--out, --resume and --device: where a training stage writes its run and what it runs on."""
    parser.add_argument("--out", default=out, help=f"run directory (default: {out})")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def add_train_arguments(parser: argparse.ArgumentParser, fixed: Fixed | None = None, **defaults: Any) -> None:
    """One command-line flag per TrainConfig field (--max-steps, --lr, ...), with a stage's own defaults; the
    fields in `fixed` are the stage's own choice, and their flags are refused."""
    add_flags(parser, TrainConfig, fixed, **defaults)


def train_config_from(args: argparse.Namespace, fixed: Fixed | None = None) -> TrainConfig:
    """The TrainConfig the flags of `add_train_arguments` describe, checked; refuses to overwrite a run."""
    out = Path(args.out)
    if not args.resume and (out / "latest").exists():
        raise ValueError(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")
    return settings_from(TrainConfig, args, fixed)
