"""GRPO throughput, nanoseek against TRL's GRPOTrainer, on the same checkpoint, task and settings, in one run.

The checkpoint is a `nano` model with random weights and a BPE tokenizer trained on the built-in corpus
(nanoseek writes it; TRL loads it through transformers). Both run GRPO on arithmetic prompts rendered with the
checkpoint's chat template: P prompts x G samples per step, up to --new-tokens new tokens at temperature 1,
beta = 0, one update per rollout batch, loss over completion tokens, reward = accuracy. Throughput counts the
prompt and completion tokens a step processes (rollout plus update) per second, median over the timed steps
after a warm-up step. TRL is not a nanoseek dependency: `pip install trl` to run this.

Run: `python bench/grpo.py [--prompts 8] [--group 8] [--new-tokens 64] [--steps 3] [--grad-accum 1]`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoseek  # noqa: E402
from nanoseek.r1 import ChatLayout  # noqa: E402
from nanoseek.rewards import RewardSet  # noqa: E402
from nanoseek.tasks import make_problem  # noqa: E402
from nanoseek.tasks.corpus import generate_corpus  # noqa: E402
from nanoseek.tokenizer import train_tokenizer  # noqa: E402
from nanoseek.train import TrainConfig  # noqa: E402
from nanoseek.train.grpo import GRPOConfig, GRPOTrainer, PromptSource  # noqa: E402

CHAT = ChatLayout()  # TRL renders the same chat template; its replies are parsed as ours are


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches of --prompts per step (both sides "
                        "sample a step's micro-batches together)")
    args = parser.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    tokenizer = train_tokenizer(generate_corpus(2000, seed=0), nanoseek.preset(args.preset).vocab_size)
    model_dir = tmp / "model"
    model = nanoseek.CausalLM(nanoseek.preset(args.preset, num_nextn_predict_layers=0))
    model.generation_config = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    model.save_pretrained(model_dir)
    tokenizer.save(model_dir)
    steps = args.steps + 1  # the first is a warm-up
    problems = [make_problem("arithmetic", i) for i in range(args.prompts * args.grad_accum * steps)]
    ours_rate, prompt_tokens = _ours(args, model_dir, tokenizer, problems, steps, tmp)
    theirs_rate = _theirs(args, model_dir, problems, steps, prompt_tokens, tmp)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, cpu, fp32, torch {torch.__version__}")
    print(f"GRPO on arithmetic: {args.grad_accum} x {args.prompts} prompts x G = {args.group}, "
          f"up to {args.new_tokens} new tokens, "
          f"preset {args.preset}, {args.steps} timed steps")
    print(f"{'':14}{'TRL tok/s':>12}{'nanoseek tok/s':>16}{'ratio':>8}")
    print(f"{'rollout+update':14}{theirs_rate:>12.0f}{ours_rate:>16.0f}{ours_rate / theirs_rate:>7.2f}x")


def _ours(args: argparse.Namespace, model_dir: Path, tokenizer, problems: list, steps: int,
          tmp: Path) -> tuple[float, int]:
    """nanoseek's real GRPO stage of the training loop: (median tokens/s, prompt tokens per step)."""
    per_step = args.prompts * args.grad_accum
    config = TrainConfig(max_steps=steps, batch_size=args.prompts, grad_accum=args.grad_accum,
                         seq_len=args.new_tokens + 64, lr=1e-5,
                         warmup_steps=0, eval_every=10**6, save_every=10**6, mtp_lambda=0.0, bias_gamma=0.0)
    trainer = GRPOTrainer(nanoseek.load_model(model_dir), tokenizer, PromptSource(["arithmetic"]), config,
                          tmp / "ours", GRPOConfig(loss_type="dapo", group_size=args.group,
                                                   max_new_tokens=args.new_tokens), RewardSet({"accuracy": 1.0}))
    prompt = trainer.template.prompt
    prompt_tokens = args.group * sum(len(prompt(tokenizer, q.question).ids) for q in problems[:per_step])
    rates = []
    for step in range(steps):
        start = time.perf_counter()
        metrics = trainer.train_step()  # metrics["tokens"]: completion tokens of the step
        if step:
            rates.append((metrics["tokens"] + prompt_tokens) / (time.perf_counter() - start))
    return statistics.median(rates), prompt_tokens


def _theirs(args: argparse.Namespace, model_dir: Path, problems: list, steps: int, prompt_tokens: int,
            tmp: Path) -> float:
    """TRL's GRPOTrainer on the same checkpoint through transformers: median tokens/s."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer as TRLGRPOTrainer

    answers = {p.question: p for p in problems}

    def accuracy(prompts, completions, **kwargs) -> list[float]:
        return [float(answers[_question(p)].check(CHAT.parse(c, True).answer)) for p, c in zip(prompts, completions,
                                                                                                strict=True)]

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}]} for p in problems])
    trl_args = TRLGRPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=args.prompts * args.group,
                             num_generations=args.group, max_completion_length=args.new_tokens, temperature=1.0,
                             gradient_accumulation_steps=args.grad_accum, beta=0.0, learning_rate=1e-5,
                             max_steps=steps, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
                             save_strategy="no", loss_type="dapo", shuffle_dataset=False)
    timer = _StepTimer()
    theirs = TRLGRPOTrainer(model=str(model_dir), reward_funcs=accuracy, args=trl_args, train_dataset=dataset,
                            processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[timer])
    theirs.train()
    lengths = [log["completions/mean_length"] for log in theirs.state.log_history if "completions/mean_length" in log]
    per_step = args.prompts * args.grad_accum
    rates = [(per_step * args.group * length + prompt_tokens) / seconds
             for length, seconds in zip(lengths[1:], timer.durations[1:], strict=False)]
    return statistics.median(rates)


class _StepTimer:
    """A transformers TrainerCallback (duck-typed) that records each optimizer step's wall time."""

    def __init__(self):
        self.durations: list[float] = []
        self._start = 0.0

    def on_step_begin(self, *args, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        self.durations.append(time.perf_counter() - self._start)

    def __getattr__(self, name):  # every other callback event: nothing to do
        return lambda *args, **kwargs: None


def _question(prompt) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)


if __name__ == "__main__":
    main()
