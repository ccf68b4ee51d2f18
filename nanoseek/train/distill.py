"""`nanoseek distill`: a dense student learns the teacher's reasoning (DeepSeek-R1 §2.4, Table 6).

DeepSeek-R1 distilled by plain SFT on ~800k samples the teacher wrote (rejection-sampled, verified); the
student here is trained the same way on the teacher's traces (`--data`, from `nanoseek rejection-sample`,
or sampled from `--teacher` first). When teacher and student share a tokenizer, `--kd-weight` adds logit
distillation: the forward KL from the teacher's next-token distribution to the student's, at
`--kd-temperature`, on the reply tokens (Hinton et al.'s soft targets; t^2 keeps gradient scales equal).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import load_model, load_tokenizer, read_config
from ..config import DENSE_PRESETS, DenseConfig
from ..data import Batch, ChatSequences
from ..flags import add_flags, settings_field, settings_from
from ..model import DenseLM, LanguageModel
from ..tokenizer import Tokenizer
from .config import PRETRAIN_ONLY, TrainConfig, add_run_arguments, add_train_arguments, train_config_from
from .loop import Trainer
from .losses import IGNORE, token_loss_sum
from .sft import ConversationData, conversations


@dataclass
class DistillConfig:
    kd_weight: float = settings_field(0.0, "weight of the logit-distillation KL (needs --teacher)")
    kd_temperature: float = settings_field(1.0, "temperature of the logit-distillation KL")

    def validate(self) -> DistillConfig:
        if self.kd_weight < 0 or self.kd_temperature <= 0:
            raise ValueError(f"--kd-weight = {self.kd_weight}, --kd-temperature = {self.kd_temperature}: need "
                             "weight >= 0 and temperature > 0")
        return self


class DistillTrainer(Trainer):
    """SFT on traces, plus `kd_weight` x KL(teacher || student) per reply token when a teacher is given."""

    def __init__(self, student: LanguageModel, tokenizer: Tokenizer, data: ChatSequences, config: TrainConfig,
                 out: Path, teacher: LanguageModel | None = None, settings: DistillConfig | None = None,
                 resume: bool = False):
        settings = (settings or DistillConfig()).validate()
        kd_weight = settings.kd_weight
        if kd_weight and teacher is None:
            raise ValueError("--kd-weight > 0 needs --teacher (its logits are the soft targets)")
        if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
            raise ValueError(f"--teacher: vocabulary of {teacher.config.vocab_size} tokens, the student's has "
                             f"{student.config.vocab_size}; logit distillation needs one tokenizer")
        super().__init__(student, tokenizer, data, config, out, resume=resume)
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None and kd_weight else None
        self.kd_weight, self.kd_temperature = kd_weight, settings.kd_temperature

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


# The loop's settings a dense student does not use, refused as flags of `nanoseek distill`.
DISTILL_FIXED = {
    **PRETRAIN_ONLY,
    "mtp_lambda": (0.0, "the dense student has no MTP module"),
    "balance_alpha": (0.0, "the dense student has no router to balance"),
    "bias_gamma": (0.0, "the dense student has no router to balance"),
}
DATA_HELP = ("teacher traces: JSONL conversations (nanoseek rejection-sample); R1 distilled on its stage-3 SFT set, "
             "the traces and other data, which --examples can mix in")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", required=True, help="student checkpoint directory, or a preset to start "
                        f"from random weights ({', '.join(DENSE_PRESETS)})")
    parser.add_argument("--teacher", help="teacher checkpoint: its tokenizer for a new student, its logits for "
                        "--kd-weight")
    add_flags(parser, ConversationData, helps={"data": DATA_HELP})
    add_flags(parser, DistillConfig)
    add_run_arguments(parser, "runs/distill")
    add_train_arguments(parser, DISTILL_FIXED, max_steps=300, lr=1e-3, warmup_steps=10, seq_len=256)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    config = train_config_from(args, DISTILL_FIXED)
    source, settings = settings_from(ConversationData, args), settings_from(DistillConfig, args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if Path(args.student).is_dir():
        student, tokenizer_dir = load_model(args.student, device=device, dtype=torch.float32), args.student
    else:
        if not args.teacher:
            raise ValueError("--student is a preset: --teacher gives the tokenizer it starts with")
        torch.manual_seed(config.seed)
        student, tokenizer_dir = new_student(args.student, Path(args.teacher)).to(device), args.teacher
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer is None or not tokenizer.chat_template:
        raise ValueError(f"{tokenizer_dir}: distillation needs a tokenizer with a chat_template")
    teacher = load_model(args.teacher, device=device, dtype=torch.float32) if args.teacher and settings.kd_weight \
        else None
    if not source.data and source.examples is None:
        raise ValueError("--data: the teacher's traces to distil (or --examples N generated conversations)")
    rows = conversations(source, config.seed)
    data = ChatSequences(rows, tokenizer, config.seq_len, config.seed)
    trainer = DistillTrainer(student, tokenizer, data, config, out, teacher, settings, resume=args.resume)
    print(f"distill: {len(rows)} conversations into a {student.config.model_type} student "
          f"({sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters), {config.max_steps} steps"
          + (f", logit KD weight {settings.kd_weight}" if teacher is not None else ""))
    last = trainer.run()
    print(f"done: loss {last.get('loss', float('nan')):.3f}, validation loss {last.get('val_loss', float('nan')):.3f};"
          f" checkpoint {out / 'latest'}")
    return 0
