"""`nanoseek distill`: a dense student learns the teacher's reasoning (DeepSeek-R1 §2.4, Table 6).

DeepSeek-R1 distilled by plain SFT on ~800k samples the teacher wrote (rejection-sampled, verified); the
student here is trained the same way on the teacher's traces (`--data`, from `nanoseek rejection-sample`,
or sampled from `--teacher` first). When teacher and student share a tokenizer, `--kd-weight` adds logit
distillation: the forward KL from the teacher's next-token distribution to the student's, at
`--kd-temperature`, on the reply tokens (Hinton et al.'s soft targets; t^2 keeps gradient scales equal).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import load_model, read_config
from ..data import Batch, ChatSequences
from ..model import CausalLM
from ..model.dense import DENSE_PRESETS, DenseConfig, DenseLM
from ..tokenizer import Tokenizer
from .loop import Trainer, add_train_arguments, train_config_from
from .losses import IGNORE, token_loss_sum
from .sft import add_data_arguments, conversations


class DistillTrainer(Trainer):
    """SFT on traces, plus `kd_weight` x KL(teacher || student) per reply token when a teacher is given."""

    def __init__(self, student, tokenizer, data, config, out, teacher: CausalLM | DenseLM | None = None,
                 kd_weight: float = 0.0, kd_temperature: float = 1.0, resume: bool = False):
        if kd_weight < 0 or kd_temperature <= 0:
            raise ValueError(f"--kd-weight = {kd_weight}, --kd-temperature = {kd_temperature}: need weight >= 0 "
                             "and temperature > 0")
        if kd_weight and teacher is None:
            raise ValueError("--kd-weight > 0 needs --teacher (its logits are the soft targets)")
        if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
            raise ValueError(f"--teacher: vocabulary of {teacher.config.vocab_size} tokens, the student's has "
                             f"{student.config.vocab_size}; logit distillation needs one tokenizer")
        super().__init__(student, tokenizer, data, config, out, resume=resume)
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None and kd_weight else None
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature

    def loss(self, batch: Batch, counts: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict, int]:
        if self.teacher is None:
            return super().loss(batch, counts)
        inputs, targets = batch.inputs.to(self.model.device), batch.targets.to(self.model.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device_type == "cuda"):
            logits = self.module(inputs)
        mask = targets != IGNORE
        tokens = mask.sum().clamp_min(1)
        ce = token_loss_sum(logits, targets) / tokens
        t = self.kd_temperature
        with torch.no_grad():
            teacher = (self.teacher(inputs).float() / t).log_softmax(-1)[mask]
        student = (logits.float() / t).log_softmax(-1)[mask]
        kd = F.kl_div(student, teacher, log_target=True, reduction="sum") / tokens * t * t
        total = ce + self.kd_weight * kd
        return total, {"ce": ce.item(), "kd": kd.item(), "loss": total.item()}, int(tokens)


def new_student(name: str, teacher_dir: Path) -> DenseLM:
    """A randomly initialised student from a preset, with the teacher's vocabulary and special token ids."""
    if name not in DENSE_PRESETS:
        raise ValueError(f"--student {name!r}: a checkpoint directory or a preset ({', '.join(DENSE_PRESETS)})")
    teacher = read_config(teacher_dir / "config.json")
    config = DenseConfig(**DENSE_PRESETS[name], vocab_size=teacher.vocab_size, bos_token_id=teacher.bos_token_id,
                         eos_token_id=teacher.eos_token_id)
    return DenseLM(config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", required=True, help="student checkpoint directory, or a preset to start "
                        f"from random weights ({', '.join(DENSE_PRESETS)})")
    parser.add_argument("--teacher", help="teacher checkpoint: its tokenizer for a new student, its logits for "
                        "--kd-weight")
    add_data_arguments(parser, "teacher traces: JSONL conversations (nanoseek rejection-sample); R1 distilled on "
                       "its stage-3 SFT set, the traces and other data, which --examples can mix in")
    parser.add_argument("--kd-weight", type=float, default=0.0, help="weight of the logit-distillation KL")
    parser.add_argument("--kd-temperature", type=float, default=1.0)
    parser.add_argument("--out", default="runs/distill")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default=None)
    add_train_arguments(parser, max_steps=300, lr=1e-3, warmup_steps=10, seq_len=256, mtp_lambda=0.0,
                        bias_gamma=0.0)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    config = train_config_from(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if Path(args.student).is_dir():
        student, tokenizer_dir = load_model(args.student, device=device, dtype=torch.float32), args.student
    else:
        if not args.teacher:
            raise ValueError("--student is a preset: --teacher gives the tokenizer it starts with")
        torch.manual_seed(config.seed)
        student, tokenizer_dir = new_student(args.student, Path(args.teacher)).to(device), args.teacher
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    if tokenizer is None or not tokenizer.chat_template:
        raise ValueError(f"{tokenizer_dir}: distillation needs a tokenizer with a chat_template")
    teacher = load_model(args.teacher, device=device, dtype=torch.float32) if args.teacher and args.kd_weight \
        else None
    if not args.data and args.examples is None:
        raise ValueError("--data: the teacher's traces to distil (or --examples N generated conversations)")
    rows = conversations(args, config.seed)
    data = ChatSequences(rows, tokenizer, config.seq_len, config.seed)
    trainer = DistillTrainer(student, tokenizer, data, config, out, teacher, args.kd_weight, args.kd_temperature,
                             resume=args.resume)
    print(f"distill: {len(rows)} conversations into a {student.config.model_type} student "
          f"({sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters), {config.max_steps} steps"
          + (f", logit KD weight {args.kd_weight}" if teacher is not None else ""))
    last = trainer.run()
    print(f"done: loss {last.get('loss', float('nan')):.3f}, validation loss {last.get('val_loss', float('nan')):.3f};"
          f" checkpoint {out / 'latest'}")
    return 0
