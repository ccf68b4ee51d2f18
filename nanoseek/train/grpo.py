"""The GRPO objective and its published variants, as switches (spec grpo-r1.md §1.2-1.3, §3.1-3.2).

* DeepSeekMath/R1 GRPO: group advantages (r - mean) / std, clipped ratio, k3 KL to a reference in the loss,
  each sequence's token mean, then the mean over sequences.
* Dr. GRPO: no std division, token sums over a constant (sequences x max completion length).
* DAPO: token-level mean over the batch, clip-higher (epsilon_high > epsilon_low), no KL; its dynamic sampling
  and overlong filtering act on the rollouts (see `zero_variance_groups` and the loss mask).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoint import load_model
from ..engine import LLM, SamplingParams
from ..model import CausalLM
from ..rewards import Completion, RewardSet
from ..tasks import Problem, make_problem, parse_tasks, training_problem
from ..tokenizer import Tokenizer
from .loop import TrainConfig, Trainer, add_train_arguments, run_distributed, train_config_from
from .losses import IGNORE, add_routed_counts

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


@dataclass
class GRPOObjective:
    loss_type: str = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # DAPO: 0.28
    beta: float = 0.0  # k3 KL coefficient; 0 keeps no reference model
    scale_rewards: bool = True  # divide advantages by the group's std (Dr. GRPO: False)

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type = {self.loss_type!r}: one of {', '.join(LOSS_TYPES)}")
        if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0):
            raise ValueError(f"epsilon_low = {self.epsilon_low}, epsilon_high = {self.epsilon_high}: need "
                             "0 <= epsilon_low < 1 and epsilon_high >= 0")
        if self.beta < 0:
            raise ValueError(f"beta = {self.beta}: must be >= 0")

    def advantages(self, rewards: Tensor) -> Tensor:
        """rewards [prompts, G] -> advantages [prompts, G]: centred on the group mean, divided by the group's
        (Bessel) standard deviation unless Dr. GRPO's unscaled form is asked for."""
        if rewards.shape[-1] < 2:
            raise ValueError(f"group size G = {rewards.shape[-1]}: GRPO needs G >= 2 samples per prompt")
        centred = rewards - rewards.mean(dim=-1, keepdim=True)
        if not self.scale_rewards:
            return centred
        return centred / (rewards.std(dim=-1, keepdim=True) + 1e-4)

    def loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, max_length: int | None = None,
             ref_logp: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """Policy loss over completions: logp/old_logp/ref_logp/mask [N, T] (token log-probs of the sampled
        tokens under the current, rollout and reference policies), advantages [N]."""
        mask = mask.to(logp.dtype)
        ratio = torch.exp(logp - old_logp)
        clipped = ratio.clamp(1 - self.epsilon_low, 1 + self.epsilon_high)
        advantage = advantages[:, None]
        per_token = -torch.minimum(ratio * advantage, clipped * advantage)
        kl = None
        if self.beta:
            if ref_logp is None:
                raise ValueError("beta > 0 needs the reference model's log-probs")
            delta = ref_logp - logp
            kl = torch.exp(delta) - delta - 1  # k3: unbiased, >= 0 (spec §1.3)
            per_token = per_token + self.beta * kl
        lengths = mask.sum(dim=-1)
        if self.loss_type == "grpo":
            loss = ((per_token * mask).sum(dim=-1) / lengths.clamp_min(1)).mean()
        elif self.loss_type == "dapo":
            loss = (per_token * mask).sum() / mask.sum().clamp_min(1)
        else:
            loss = (per_token * mask).sum() / (logp.shape[0] * (max_length or logp.shape[1]))
        tokens, live = mask.sum().clamp_min(1), mask.bool()
        with torch.no_grad():  # the share of tokens whose ratio the clip holds at a bound
            stats = {
                "clip_low": float(((ratio < 1 - self.epsilon_low) & (advantage < 0) & live).sum() / tokens),
                "clip_high": float(((ratio > 1 + self.epsilon_high) & (advantage > 0) & live).sum() / tokens),
                "kl": float((kl * mask).sum() / tokens) if kl is not None else 0.0,
            }
        return loss, stats


def zero_variance_groups(rewards: Tensor) -> Tensor:
    """[prompts] bool: groups whose G rewards are all equal, which carry no signal (DAPO drops them)."""
    return (rewards == rewards[:, :1]).all(dim=-1)


# ---- the GRPO stage of the training loop ------------------------------------------------------------------
@dataclass
class PromptSource:
    """Which problems come next, and an adaptive curriculum: a task's difficulty rises when a step's groups pass
    more than `high` of the time on average and falls below `low`, keeping pass rates near the edge of
    competence (spec grpo-r1.md §4: group pass rates in ~[0.2, 0.8]). The mean over the step matters: single
    groups of a model at 45% pass all or nothing often, and moving on each of them is a random walk that
    spends steps on a level the model cannot solve at all."""

    tasks: list[str]
    seed: int = 0
    difficulty: dict[str, int] = field(default_factory=dict)
    max_difficulty: int = 5
    low: float = 0.2
    high: float = 0.8
    index: int = 0
    rank: int = 0  # under torchrun each rank draws its own problems: index * world + rank
    world: int = 1

    def __post_init__(self) -> None:
        for task in self.tasks:
            self.difficulty.setdefault(task, 1)

    def next(self, count: int) -> list[Problem]:
        problems = []
        for _ in range(count):  # task by task in turn; held-out questions are skipped
            task = self.tasks[self.index % len(self.tasks)]
            number = self.index * self.world + self.rank
            problem = training_problem(task, self.seed * 1_000_003 + number, self.difficulty[task])
            problems.append(problem)
            self.index += 1
        return problems

    def update(self, task: str, pass_rates: list[float]) -> None:
        """One move at most, from the mean pass rate of the task's groups sampled together (a step's, or one
        dynamic-sampling round's)."""
        pass_rate = statistics.mean(pass_rates)
        if pass_rate > self.high:
            self.difficulty[task] = min(self.max_difficulty, self.difficulty[task] + 1)
        elif pass_rate < self.low:
            self.difficulty[task] = max(1, self.difficulty[task] - 1)

    def state(self) -> dict:
        return {"index": self.index, "difficulty": dict(self.difficulty), "seed": self.seed}

    def load_state(self, state: dict) -> None:
        self.index, self.difficulty = state["index"], dict(state["difficulty"])


@dataclass
class Group:
    """The G completions of one prompt: their rewards, reward parts, correctness, lengths and token rows."""

    rewards: list[float] = field(default_factory=list)
    parts: list[dict[str, float]] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    rows: list[tuple[list[int], list[int], bool]] = field(default_factory=list)

    def add(self, reward: float, parts: dict[str, float], correct: bool, length: int,
            row: tuple[list[int], list[int], bool]) -> None:
        self.rewards.append(reward)
        self.parts.append(parts)
        self.correct.append(correct)
        self.lengths.append(length)
        self.rows.append(row)

    @property
    def passed(self) -> int:
        return sum(self.correct)

    @property
    def zero_variance(self) -> bool:
        return all(r == self.rewards[0] for r in self.rewards)


@dataclass
class Rollouts:
    inputs: Tensor  # [N, T] prompt + completion, right-padded
    real: Tensor  # [N, T] False at padding
    positions: Tensor  # [N, C] the positions that predict the completion's tokens (C: the longest completion)
    targets: Tensor  # [N, C] the completion's tokens, IGNORE past its end
    advantages: Tensor  # [N]
    old_logp: Tensor | None  # [N, C]; None on policy (one update per rollout batch: the current log-probs)
    ref_logp: Tensor | None
    metrics: dict[str, float]


class GRPOTrainer(Trainer):
    """The training loop with rollouts as data and the GRPO objective as loss (the same model object samples
    with the engine and computes the training log-probs)."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, prompts: PromptSource, config: TrainConfig, out: Path,
                 objective: GRPOObjective, rewards: RewardSet, group_size: int = 8, max_new_tokens: int = 128,
                 temperature: float = 1.0, overlong_filter: bool = False, dynamic_sampling: bool = False,
                 updates_per_batch: int = 1, resume: bool = False, resample_rounds: int = 2):
        if group_size < 2:
            raise ValueError(f"--group-size = {group_size}: GRPO needs G >= 2 samples per prompt")
        if not temperature > 0:
            raise ValueError(f"--temperature = {temperature}: GRPO samples its groups, so it needs > 0")
        if resample_rounds < 0:
            raise ValueError(f"--resample-rounds = {resample_rounds}: must be >= 0")
        if updates_per_batch < 1:
            raise ValueError(f"--updates-per-batch = {updates_per_batch}: must be >= 1")
        self.updates_per_batch = updates_per_batch  # mu: optimizer steps on each batch of rollouts
        self.resample_rounds = resample_rounds  # dynamic sampling: extra batches of prompts drawn at most
        self._rollouts: list[Rollouts] = []
        self._served = 0
        super().__init__(model, tokenizer, prompts, config, out, resume=resume)
        prompts.rank, prompts.world = self.rank, self.world
        self.objective, self.rewards, self.group_size = objective, rewards, group_size
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.overlong_filter, self.dynamic_sampling = overlong_filter, dynamic_sampling
        rows = config.batch_size * group_size  # a step's sequences decode together, up to 512 (see _rollout_step)
        self.engine = LLM(model, device=model.device, dtype=model.dtype,
                          max_num_seqs=max(rows, min(512, rows * config.grad_accum)), max_model_len=config.seq_len,
                          tokenizer=tokenizer)
        self.reference = None
        if objective.beta:  # a frozen copy of the starting policy
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def prompt_ids(self, problem: Problem) -> list[int]:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": problem.question}])
        return self.tokenizer.encode(text, add_special_tokens=False)

    def next_batch(self) -> Rollouts:
        """Micro-batches of rollouts; every mu optimizer steps reuse the same ones, their old log-probs fixed at
        sampling time (the clipped ratio is what keeps the later updates near the sampling policy)."""
        per_batch = self.config.grad_accum
        if self._served == per_batch * self.updates_per_batch:
            self._rollouts, self._served = [], 0
        if not self._rollouts:
            self._rollouts = self._rollout_step(per_batch)
        batch = self._rollouts[self._served % per_batch]
        self._served += 1
        return batch

    def _rollout_step(self, count: int) -> list[Rollouts]:
        """A step's `count` micro-batches from one engine call: decoding all their sequences together keeps a
        small model's matrices wide (at 8 prompts x G = 8 x 8 micro-batches, 512 rows instead of 64)."""
        size = self.config.batch_size
        groups = self._sample_groups(self.data.next(size * count))
        return [self._rollout(groups[i * size:(i + 1) * size]) for i in range(count)]

    def _rollout(self, groups: list[Group]) -> Rollouts:
        """One micro-batch from `batch_size` sampled groups. With DAPO's dynamic sampling, more prompts are drawn
        (up to `resample_rounds` extra batches) until the batch holds `batch_size` groups whose rewards differ;
        any shortfall is filled with zero-variance groups, whose advantages are zero."""
        size = self.config.batch_size
        batch = groups
        if self.dynamic_sampling:
            informative = [g for g in groups if not g.zero_variance]
            for _ in range(self.resample_rounds):
                if len(informative) >= size:
                    break
                more = self._sample_groups(self.data.next(size))
                groups += more
                informative += [g for g in more if not g.zero_variance]
            flat = [g for g in groups if g.zero_variance]
            batch = (informative + flat)[:size]
        rewards = torch.tensor([g.rewards for g in batch])
        advantages = self.objective.advantages(rewards)
        zero = zero_variance_groups(rewards)
        if self.dynamic_sampling:
            advantages = advantages.masked_fill(zero[:, None], 0.0)
        device = self.model.device
        inputs, real, positions, targets = (t.to(device) for t in self._pack([row for g in batch for row in g.rows]))
        with torch.no_grad():
            # with one update per batch the sampling policy is the one being trained: no extra forward needed
            old_logp = self._token_logp(self.model(inputs, logits_index=positions), targets) \
                if self.updates_per_batch > 1 else None
            ref_logp = self._token_logp(self.reference(inputs, logits_index=positions), targets) \
                if self.reference is not None else None
        return Rollouts(inputs, real, positions, targets, advantages.flatten().to(device), old_logp, ref_logp,
                        self._rollout_metrics(groups, zero))

    def _sample_groups(self, problems: list[Problem]) -> list[Group]:
        first = self.data.index - len(problems)  # each problem's own seed: independent draws across prompts
        base = self.config.seed * 1_000_003 + 7_919 * self.step + 104_729 * self.rank
        params = [SamplingParams(n=self.group_size, temperature=self.temperature, max_tokens=self.max_new_tokens,
                                 seed=base + first + i) for i in range(len(problems))]
        outputs = self.engine.generate([self.prompt_ids(p) for p in problems], params)
        groups, pass_rates = [], {}
        for problem, output in zip(problems, outputs, strict=True):
            group = Group()
            for completion in output.outputs:
                truncated = completion.finish_reason == "length"
                scored = Completion(problem, completion.text, len(completion.token_ids), self.max_new_tokens,
                                    truncated)
                total, parts = self.rewards(scored)
                accurate = problem.check_reply(completion.text) and not truncated
                group.add(total, parts, accurate, len(completion.token_ids),
                          (output.prompt_token_ids, completion.token_ids, truncated))
            pass_rates.setdefault(problem.task, []).append(group.passed / len(group.rewards))
            groups.append(group)
        for task, rates in pass_rates.items():
            self.data.update(task, rates)  # the curriculum follows correctness, not the shaped reward
        return groups

    @staticmethod
    def _rollout_metrics(groups: list[Group], zero_in_batch: Tensor) -> dict[str, float]:
        """Metrics of everything sampled (the policy's behaviour), and of the batch trained on."""
        parts = [p for g in groups for p in g.parts]
        correct = [n for g in groups for n, ok in zip(g.lengths, g.correct, strict=True) if ok]
        wrong = [n for g in groups for n, ok in zip(g.lengths, g.correct, strict=True) if not ok]
        return {"reward": statistics.mean(r for g in groups for r in g.rewards),
                "accuracy": len(correct) / (len(correct) + len(wrong)),
                "zero_variance": statistics.mean(g.zero_variance for g in groups),
                "zero_variance_trained": zero_in_batch.float().mean().item(),
                "prompts_sampled": float(len(groups)),
                "length_correct": statistics.mean(correct) if correct else 0.0,
                "length_wrong": statistics.mean(wrong) if wrong else 0.0,
                **{f"reward_{name}": statistics.mean(p[name] for p in parts) for name in parts[0]}}

    def _pack(self, rows: list[tuple[list[int], list[int], bool]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Inputs [N, T] (prompt + completion, right-padded) and their real positions, and for the completions
        only, the positions [N, C] that predict them and their tokens. The head and the log-softmax run at those
        positions alone: in the `nano` preset the head is 40% of a position's FLOPs, and a short arithmetic prompt
        is a third of a row."""
        width = max(len(p) + len(c) for p, c, _ in rows) - 1
        span = max(1, max(len(c) for _, c, _ in rows))
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        real = torch.zeros(len(rows), width, dtype=torch.bool)
        prompt_lengths = torch.tensor([len(p) for p, _, _ in rows])
        positions = (torch.arange(span) + prompt_lengths[:, None] - 1).clamp_max(width - 1)
        targets = torch.full((len(rows), span), IGNORE, dtype=torch.long)
        for i, (prompt, completion, truncated) in enumerate(rows):
            sequence = prompt + completion
            inputs[i, : len(sequence) - 1] = torch.tensor(sequence[:-1])
            real[i, : len(sequence) - 1] = True
            if completion and not (truncated and self.overlong_filter):  # DAPO's overlong filtering
                targets[i, : len(completion)] = torch.tensor(completion)
        return inputs, real, positions, targets

    def loss(self, batch: Rollouts, counts: list[Tensor] | None = None) -> tuple[Tensor, dict, int]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device_type == "cuda"):
            out = self.module(batch.inputs, router_stats=True, logits_index=batch.positions)
        log_probs = self._log_softmax(out.logits)
        mask = batch.targets != IGNORE
        logp = log_probs.gather(-1, batch.targets.clamp_min(0)[..., None])[..., 0].masked_fill(~mask, 0.0)
        old_logp = logp.detach() if batch.old_logp is None else batch.old_logp
        loss, stats = self.objective.loss(logp, old_logp, batch.advantages, mask, self.max_new_tokens, batch.ref_logp)
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            stats["entropy"] = float((entropy * mask).sum() / mask.sum().clamp_min(1))
        if counts is not None:
            add_routed_counts(counts, out, batch.real)
        return loss, {"loss": loss.item(), **stats, **batch.metrics}, int(mask.sum())

    def _log_softmax(self, logits: Tensor) -> Tensor:
        """Log-probs of the policy that sampled the rollouts: the logits divided by the sampling temperature,
        so the ratio and the KL compare the distributions the samples came from (as TRL does)."""
        return (logits.float() / self.temperature).log_softmax(-1)

    def _token_logp(self, logits: Tensor, targets: Tensor) -> Tensor:
        """log p of each target token [N, T] (0 where the target is IGNORE)."""
        logp = self._log_softmax(logits).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        return logp.masked_fill(targets == IGNORE, 0.0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy on held-out problems of each task at its current difficulty (a debugging view; the
        R1 protocol is `nanoseek eval`)."""
        problems = [make_problem(t, i, self.data.difficulty[t], "eval") for t in self.data.tasks for i in range(8)]
        params = SamplingParams(temperature=0, max_tokens=self.max_new_tokens)
        outputs = self.engine.generate([self.prompt_ids(p) for p in problems], params)
        right = [p.check_reply(o.outputs[0].text) for p, o in zip(problems, outputs, strict=True)]
        return {"val_accuracy": sum(right) / len(right)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint to train (an SFT-primed one in the R1 recipe)")
    parser.add_argument("--out", default="runs/grpo")
    parser.add_argument("--tasks", default="arithmetic")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--loss-type", choices=LOSS_TYPES, default="grpo")
    parser.add_argument("--epsilon-low", type=float, default=0.2)
    parser.add_argument("--epsilon-high", type=float, default=0.2)
    parser.add_argument("--beta", type=float, default=0.0, help="k3 KL coefficient (0: no reference model)")
    parser.add_argument("--updates-per-batch", type=int, default=1, help="mu: optimizer steps per rollout batch")
    parser.add_argument("--no-scale-rewards", action="store_true", help="Dr. GRPO: do not divide by the std")
    parser.add_argument("--overlong-filter", action="store_true", help="DAPO: no loss on truncated samples")
    parser.add_argument("--dynamic-sampling", action="store_true", help="DAPO: replace zero-variance groups by "
                        "groups of newly drawn prompts (up to --resample-rounds extra batches)")
    parser.add_argument("--resample-rounds", type=int, default=2)
    parser.add_argument("--reward-weights", default="accuracy=1,format=0.1")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default=None)
    add_train_arguments(parser, max_steps=50, batch_size=8, seq_len=256, lr=2e-5, warmup_steps=0, eval_every=10,
                        save_every=25, mtp_lambda=0.0)


def run(args: argparse.Namespace) -> int:
    """One process, or one per rank under torchrun (data-parallel updates, each rank its own prompts)."""
    return run_distributed(_run, args)


def _run(args: argparse.Namespace, rank: int, device: torch.device) -> int:
    out = Path(args.out)
    config = train_config_from(args)
    tasks = parse_tasks(args.tasks)
    weights = {}
    for item in args.reward_weights.split(","):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError as exc:
            raise ValueError(f"--reward-weights: {item!r} is not name=number") from exc
    objective = GRPOObjective(args.loss_type, args.epsilon_low, args.epsilon_high, args.beta,
                              not args.no_scale_rewards)
    model = load_model(args.model, device=device, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(args.model)
    if tokenizer is None or not tokenizer.chat_template:
        raise ValueError(f"--model {args.model}: GRPO needs a tokenizer with a chat_template in the checkpoint")
    trainer = GRPOTrainer(model, tokenizer, PromptSource(tasks, config.seed), config, out, objective,
                          RewardSet(weights), args.group_size, args.max_new_tokens, args.temperature,
                          args.overlong_filter, args.dynamic_sampling, args.updates_per_batch, resume=args.resume,
                          resample_rounds=args.resample_rounds)
    if rank == 0:
        print(f"grpo ({args.loss_type}): {config.max_steps} steps of {config.batch_size * config.grad_accum} prompts "
              f"x G = {args.group_size}" + (f" on each of {trainer.world} ranks" if trainer.world > 1 else "")
              + f" on {', '.join(tasks)} from {args.model}")
    last = trainer.run()
    if rank == 0:
        print(f"done: reward {last.get('reward', float('nan')):.3f}, accuracy {last.get('accuracy', float('nan')):.2f},"
              f" held-out greedy accuracy {last.get('val_accuracy', float('nan')):.2f}; checkpoint {out / 'latest'}")
    return 0
