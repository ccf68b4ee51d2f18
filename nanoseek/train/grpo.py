"""The GRPO objective and its published variants, as switches (DeepSeekMath, arXiv 2402.03300,
§4.1; Dr. GRPO, arXiv 2503.20783; DAPO, arXiv 2503.14476).

* DeepSeekMath/R1 GRPO: group advantages (r - mean) / std, clipped ratio, k3 KL to a reference in the loss,
  each sequence's token mean, then the mean over sequences.
* Dr. GRPO: no std division, token sums over a constant (sequences x max completion length).
* DAPO: token-level mean over the batch, clip-higher (epsilon_high > epsilon_low), no KL; its dynamic sampling
  and overlong filtering act on the rollouts (see `zero_variance_groups` and the loss mask).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoint import load_model, load_tokenizer, weights_sha256
from ..engine import LLM, SamplingParams
from ..eval import evaluate, parse_difficulties
from ..flags import add_flags, settings_field, settings_from
from ..model import LanguageModel
from ..r1 import LAYOUTS, layout
from ..rewards import REWARDS, Completion, RewardSet, accuracy, load_reward
from ..tasks import MAX_DIFFICULTY, Problem, load_problems, make_problem, parse_tasks, training_problem
from ..tokenizer import Tokenizer
from .config import PRETRAIN_ONLY, TrainConfig, add_run_arguments, add_train_arguments, train_config_from
from .loop import Trainer, run_distributed
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
            kl = torch.exp(delta) - delta - 1  # k3: unbiased, >= 0 (DeepSeekMath eq. 4)
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


@dataclass
class GRPOConfig:
    """`nanoseek grpo`'s settings beyond the training loop's: prompts, rollouts, objective and rewards."""

    tasks: str | None = settings_field(None, "built-in tasks, comma-separated (default: arithmetic)", kind=str)
    data: str | None = settings_field(None, "JSONL problems ({question, answer, ...} per line, GSM8K/MATH style) "
                                      "instead of --tasks", kind=str)
    difficulties: str | None = settings_field(None, "a fixed band of levels (e.g. 2,3,4), each prompt the next; "
                                              "default: an adaptive curriculum from level 1", kind=str)
    template: str = settings_field("chat", "prompt layout: chat (the model's chat template, which opens the think "
                                   "block) or zero (User: ... Assistant:, nothing prefilled)", choices=tuple(LAYOUTS))
    group_size: int = settings_field(8, "G: samples per prompt")
    max_new_tokens: int = settings_field(96, "completion tokens per sample at most")
    temperature: float = settings_field(1.0, "sampling temperature of the rollouts")
    updates_per_batch: int = settings_field(1, "mu: optimizer steps per rollout batch")
    overlong_filter: bool = settings_field(False, "DAPO: no loss on truncated samples")
    dynamic_sampling: bool = settings_field(False, "DAPO: replace zero-variance groups by groups of newly drawn "
                                            "prompts (up to --resample-rounds extra batches)")
    resample_rounds: int = settings_field(2, "extra prompt batches dynamic sampling draws at most")
    val_problems: int = settings_field(32, "held-out problems per task at each validation (0: none)")
    loss_type: str = settings_field("grpo", "grpo, dr_grpo or dapo", choices=LOSS_TYPES)
    epsilon_low: float = settings_field(0.2, "lower clip of the ratio")
    epsilon_high: float = settings_field(0.2, "upper clip of the ratio (DAPO's clip-higher: 0.28)")
    beta: float = settings_field(0.0, "k3 KL coefficient (0: no reference model)")
    scale_rewards: bool = settings_field(True, "divide advantages by the group's std (Dr. GRPO: --no-scale-rewards)")
    reward_weights: str = settings_field("accuracy=1,format=0.1", "name=weight,...: accuracy, format, language, "
                                         "overlong, random (a coin flip: the control), or a --reward's name")
    reward: list[str] = settings_field([], "a reward function of your own, MODULE:FUNCTION, f(prompts, completions, "
                                       "answer, **kwargs) -> list[float] (TRL's signature), weight 1 unless "
                                       "--reward-weights names it; repeatable", repeat=True)

    def validate(self) -> GRPOConfig:
        if self.group_size < 2:
            raise ValueError(f"--group-size = {self.group_size}: GRPO needs G >= 2 samples per prompt")
        if not self.temperature > 0:
            raise ValueError(f"--temperature = {self.temperature}: GRPO samples its groups, so it needs > 0")
        for name in ("max_new_tokens", "updates_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} = {getattr(self, name)}: must be >= 1")
        for name in ("resample_rounds", "val_problems"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} = {getattr(self, name)}: must be >= 0")
        if self.data and (self.tasks or self.difficulties):
            raise ValueError(f"--data {self.data}: the file is the prompt set; drop --tasks and --difficulties")
        layout(self.template)
        self.objective()
        return self

    def objective(self) -> GRPOObjective:
        return GRPOObjective(self.loss_type, self.epsilon_low, self.epsilon_high, self.beta, self.scale_rewards)


# The loop's settings GRPO does not use, refused as flags of `nanoseek grpo`.
GRPO_FIXED = {
    **PRETRAIN_ONLY,
    "mtp_lambda": (0.0, "GRPO's loss has no MTP term"),
    "balance_alpha": (0.0, "GRPO's loss has no balance term (--bias-gamma balances the routers)"),
    "eval_batches": (1, "GRPO validates on --val-problems held-out problems"),
}


def zero_variance_groups(rewards: Tensor) -> Tensor:
    """[prompts] bool: groups whose G rewards are all equal, which carry no signal (DAPO drops them)."""
    return (rewards == rewards[:, :1]).all(dim=-1)


# ---- the GRPO stage of the training loop ------------------------------------------------------------------
@dataclass
class PromptSource:
    """Which problems come next. Built-in tasks: task by task in turn, held-out questions skipped, at a fixed
    band of `levels` (each prompt the next level of the band) or, without one, under an adaptive curriculum:
    a task's difficulty rises when a step's groups pass more than `high` of the time on average and falls below
    `low`, keeping pass rates near the edge of competence (a group all right or all wrong teaches nothing:
    DAPO §3.2). The mean over the step matters: single groups of a model at 45% pass all or nothing often,
    and moving on each of them is a random walk that spends steps on a level the model cannot solve at all.
    `problems`: the user's own (`--data`), in a seeded order reshuffled every pass."""

    tasks: list[str]
    seed: int = 0
    difficulty: dict[str, int] = field(default_factory=dict)
    max_difficulty: int = 5
    low: float = 0.2
    high: float = 0.8
    index: int = 0
    rank: int = 0  # under torchrun each rank draws its own problems: index * world + rank
    world: int = 1
    levels: list[int] | None = None
    problems: list[Problem] | None = None

    def __post_init__(self) -> None:
        for level in self.levels or []:
            if not 1 <= level <= MAX_DIFFICULTY:
                raise ValueError(f"--difficulties: {level} is not in [1, {MAX_DIFFICULTY}]")
        if self.problems is not None:
            self.tasks = ["user"]
        for task in self.tasks:
            self.difficulty.setdefault(task, 1)

    def next(self, count: int) -> list[Problem]:
        problems = []
        for _ in range(count):
            number = self.index * self.world + self.rank
            problems.append(self._user_problem(number) if self.problems is not None else self._task_problem(number))
            self.index += 1
        return problems

    def _task_problem(self, number: int) -> Problem:
        task = self.tasks[self.index % len(self.tasks)]
        level = self.levels[(self.index // len(self.tasks)) % len(self.levels)] if self.levels else \
            self.difficulty[task]
        return training_problem(task, self.seed * 1_000_003 + number, level)

    def _user_problem(self, number: int) -> Problem:
        assert self.problems is not None
        epoch, position = divmod(number, len(self.problems))
        order = list(range(len(self.problems)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return self.problems[order[position]]

    def update(self, task: str, pass_rates: list[float]) -> None:
        """One move at most, from the mean pass rate of the task's groups sampled together (a step's, or one
        dynamic-sampling round's); none on a fixed band or on user problems."""
        if self.levels or self.problems is not None:
            return
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
class Sample:
    """One scored completion of a group."""

    reward: float
    parts: dict[str, float]
    correct: bool
    reasons: bool  # a think block with the task's step lines
    length: int
    truncated: bool
    row: tuple[list[int], list[int], bool]  # prompt ids, completion ids, truncated
    reward_errors: int = 0  # reward components that failed on it (each scored 0)


@dataclass
class Group:
    """The G completions of one prompt."""

    samples: list[Sample] = field(default_factory=list)

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]

    @property
    def rows(self) -> list[tuple[list[int], list[int], bool]]:
        return [s.row for s in self.samples]

    @property
    def passed(self) -> int:
        return sum(s.correct for s in self.samples)

    @property
    def zero_variance(self) -> bool:
        return all(r == self.samples[0].reward for r in self.rewards)


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

    data_position_is_global = False  # each rank draws its own prompts (PromptSource.rank, .world)

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, prompts: PromptSource, config: TrainConfig,
                 out: Path, settings: GRPOConfig, rewards: RewardSet, resume: bool = False):
        self.settings = settings.validate()
        self._rollouts: list[Rollouts] = []
        self._served = 0
        self.template = layout(settings.template)
        super().__init__(model, tokenizer, prompts, config, out, resume=resume)
        prompts.rank, prompts.world = self.rank, self.world
        self.objective, self.rewards = settings.objective(), rewards
        rows = config.batch_size * settings.group_size  # a step's sequences decode together, up to 512 (_rollout_step)
        self.engine = LLM(model, device=model.device, dtype=model.dtype,
                          max_num_seqs=max(rows, min(512, rows * config.grad_accum)), max_model_len=config.seq_len,
                          tokenizer=tokenizer)
        self.reference = None
        if settings.beta:  # a frozen copy of the starting policy
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def next_batch(self) -> Rollouts:
        """Micro-batches of rollouts; every mu optimizer steps reuse the same ones, their old log-probs fixed at
        sampling time (the clipped ratio is what keeps the later updates near the sampling policy)."""
        per_batch = self.config.grad_accum
        if self._served == per_batch * self.settings.updates_per_batch:
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
        if self.settings.dynamic_sampling:
            informative = [g for g in groups if not g.zero_variance]
            for _ in range(self.settings.resample_rounds):
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
        if self.settings.dynamic_sampling:
            advantages = advantages.masked_fill(zero[:, None], 0.0)
        device = self.model.device
        inputs, real, positions, targets = (t.to(device) for t in self._pack([row for g in batch for row in g.rows]))
        with torch.no_grad():
            # with one update per batch the sampling policy is the one being trained: no extra forward needed
            old_logp = self._token_logp(self.model(inputs, logits_index=positions), targets) \
                if self.settings.updates_per_batch > 1 else None
            ref_logp = self._token_logp(self.reference(inputs, logits_index=positions), targets) \
                if self.reference is not None else None
        return Rollouts(inputs, real, positions, targets, advantages.flatten().to(device), old_logp, ref_logp,
                        self._rollout_metrics(groups, zero))

    def _sample_groups(self, problems: list[Problem]) -> list[Group]:
        first = self.data.index - len(problems)  # each problem's own seed: independent draws across prompts
        base = self.config.seed * 1_000_003 + 7_919 * self.step + 104_729 * self.rank
        settings = self.settings
        params = [SamplingParams(n=settings.group_size, temperature=settings.temperature,
                                 max_tokens=settings.max_new_tokens, seed=base + first + i)
                  for i in range(len(problems))]
        prompts = [self.template.prompt(self.tokenizer, p.question) for p in problems]
        outputs = self.engine.generate([p.ids for p in prompts], params)
        groups, pass_rates = [], {}
        for problem, prompt, output in zip(problems, prompts, outputs, strict=True):
            completions = [Completion(problem, o.text, len(o.token_ids), settings.max_new_tokens,
                                      o.finish_reason == "length", prompt.opened, self.template)
                           for o in output.outputs]
            scores = self.rewards.score(completions)
            group = Group([Sample(total, parts, bool(accuracy(c)),
                                  problem.reasons(c.reply.reasoning), c.tokens, c.truncated,
                                  (output.prompt_token_ids, o.token_ids, c.truncated), errors)
                           for (total, parts, errors), c, o in zip(scores, completions, output.outputs,
                                                                   strict=True)])
            pass_rates.setdefault(problem.task, []).append(group.passed / len(group.samples))
            groups.append(group)
        for task, rates in pass_rates.items():
            self.data.update(task, rates)  # the curriculum follows correctness, not the shaped reward
        return groups

    def _rollout_metrics(self, groups: list[Group], zero_in_batch: Tensor) -> dict[str, float]:
        """Metrics of everything sampled (the policy's behaviour), and of the batch trained on."""
        samples = [s for g in groups for s in g.samples]
        mean = lambda values: statistics.mean(values) if values else 0.0  # noqa: E731
        subsets = {"correct": [s for s in samples if s.correct], "wrong": [s for s in samples if not s.correct],
                   "reasoning": [s for s in samples if s.reasons], "direct": [s for s in samples if not s.reasons]}
        return {"reward": mean([s.reward for s in samples]),
                "accuracy": mean([s.correct for s in samples]),
                "reasoning_share": mean([s.reasons for s in samples]),
                "length": mean([s.length for s in samples]),
                **{f"length_{name}": mean([s.length for s in subset]) for name, subset in subsets.items()},
                "accuracy_reasoning": mean([s.correct for s in subsets["reasoning"]]),
                "accuracy_direct": mean([s.correct for s in subsets["direct"]]),
                "truncated": mean([s.truncated for s in samples]),
                "zero_variance": mean([g.zero_variance for g in groups]),
                "zero_variance_trained": zero_in_batch.float().mean().item(),
                "prompts_sampled": float(len(groups)),
                "reward_errors": mean([s.reward_errors for s in samples]),  # failed components per sample
                **{f"reward_{name}": mean([s.parts[name] for s in samples]) for name in samples[0].parts}}

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
            if completion and not (truncated and self.settings.overlong_filter):  # DAPO's overlong filtering
                targets[i, : len(completion)] = torch.tensor(completion)
        return inputs, real, positions, targets

    def loss(self, batch: Rollouts, counts: list[Tensor] | None = None) -> tuple[Tensor, dict, int]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device_type == "cuda"):
            out = self.module(batch.inputs, router_stats=True, logits_index=batch.positions)
        log_probs = self._log_softmax(out.logits)
        mask = batch.targets != IGNORE
        logp = log_probs.gather(-1, batch.targets.clamp_min(0)[..., None])[..., 0].masked_fill(~mask, 0.0)
        old_logp = logp.detach() if batch.old_logp is None else batch.old_logp
        loss, stats = self.objective.loss(logp, old_logp, batch.advantages, mask, self.settings.max_new_tokens,
                                          batch.ref_logp)
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            stats["entropy"] = float((entropy * mask).sum() / mask.sum().clamp_min(1))
            # the first reply token: in the zero layout, the choice between reasoning and a direct answer
            stats["first_token_entropy"] = float(entropy[:, 0][mask[:, 0]].mean()) if mask[:, 0].any() else 0.0
        if counts is not None:
            add_routed_counts(counts, out, batch.real)
        return loss, {"loss": loss.item(), **stats, **batch.metrics}, int(mask.sum())

    def _log_softmax(self, logits: Tensor) -> Tensor:
        """Log-probs of the policy that sampled the rollouts: the logits divided by the sampling temperature,
        so the ratio and the KL compare the distributions the samples came from (as TRL does)."""
        return (logits.float() / self.settings.temperature).log_softmax(-1)

    def _token_logp(self, logits: Tensor, targets: Tensor) -> Tensor:
        """log p of each target token [N, T] (0 where the target is IGNORE)."""
        logp = self._log_softmax(logits).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        return logp.masked_fill(targets == IGNORE, 0.0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """R1's protocol (temperature 0.6, top-p 0.95) on a fixed set of held-out problems of each task at its
        current level, in the training layout: pass@1, the share of replies that reason and their mean length
        (`nanoseek eval` is the full evaluation). User problems have no held-out split here: nothing is
        reported."""
        if self.data.problems is not None or not self.settings.val_problems:
            return {}
        self.model.eval()
        levels = {t: self.data.levels[0] if self.data.levels else self.data.difficulty[t] for t in self.data.tasks}
        problems = [(make_problem(t, i, levels[t], "eval"), levels[t]) for t in self.data.tasks
                    for i in range(self.settings.val_problems)]
        scores = evaluate(self.engine, problems, samples=2, max_tokens=self.settings.max_new_tokens,
                          template=self.template.name)
        return {"val_pass1": scores["all"]["pass@1"], "val_reasoning_share": scores["all"]["reasoning_share"],
                "val_length": scores["all"]["mean_length"], "val_first_token_entropy": scores["first_token_entropy"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint to train (an SFT-primed one in the R1 recipe)")
    add_run_arguments(parser, "runs/grpo")
    add_flags(parser, GRPOConfig)
    add_train_arguments(parser, GRPO_FIXED, max_steps=50, batch_size=8, seq_len=256, lr=2e-5, warmup_steps=0,
                        eval_every=10, save_every=25)


def run(args: argparse.Namespace) -> int:
    """One process, or one per rank under torchrun (data-parallel updates, each rank its own prompts)."""
    return run_distributed(_run, args)


def reward_set(weights_text: str, specs: list[str]) -> RewardSet:
    """--reward-weights and --reward as a RewardSet."""
    weights = {}
    for item in filter(None, (i.strip() for i in weights_text.split(","))):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError as exc:
            raise ValueError(f"--reward-weights: {item!r} is not name=number") from exc
    functions: dict = {}
    for spec in specs:
        name, function = load_reward(spec)
        if name in functions or name in REWARDS:
            raise ValueError(f"--reward {spec!r}: a reward named {name!r} is already "
                             f"{'built in' if name in REWARDS else 'given'}; rename the function")
        functions[name] = function
    return RewardSet(weights, batch_functions=functions)


def _prompts(settings: GRPOConfig, seed: int) -> PromptSource:
    if settings.data:
        return PromptSource([], seed, problems=load_problems(settings.data))
    levels = parse_difficulties(settings.difficulties) if settings.difficulties else None
    return PromptSource(parse_tasks(settings.tasks or "arithmetic"), seed, levels=levels)


def _run(args: argparse.Namespace, rank: int, device: torch.device) -> int:
    out = Path(args.out)
    config = train_config_from(args, GRPO_FIXED)
    settings = settings_from(GRPOConfig, args)
    template = layout(settings.template)
    rewards = reward_set(settings.reward_weights, settings.reward)
    prompts = _prompts(settings, config.seed)
    model = load_model(args.model, device=device, dtype=torch.float32)
    if rank == 0 and not args.resume:  # which weights this run started from, for the record
        out.mkdir(parents=True, exist_ok=True)
        (out / "start.json").write_text(json.dumps({"model": str(args.model),
                                                    "sha256": weights_sha256(args.model)}, indent=2) + "\n")
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None or (template.name == "chat" and not tokenizer.chat_template):
        raise ValueError(f"--model {args.model}: GRPO with --template {template.name} needs a tokenizer"
                         + (" with a chat_template" if template.name == "chat" else "") + " in the checkpoint")
    trainer = GRPOTrainer(model, tokenizer, prompts, config, out, settings, rewards, resume=args.resume)
    if rank == 0:
        source = settings.data or ", ".join(prompts.tasks)
        print(f"grpo ({settings.loss_type}, {template.name} layout): {config.max_steps} steps of "
              f"{config.batch_size * config.grad_accum} prompts x G = {settings.group_size}"
              + (f" on each of {trainer.world} ranks" if trainer.world > 1 else "")
              + f" on {source} from {args.model}; rewards {rewards.weights}")
    last = trainer.run()
    if rank == 0:
        held_out = f", held-out pass@1 {last['val_pass1']:.1f}%" if "val_pass1" in last else ""
        print(f"done: reward {last.get('reward', float('nan')):.3f}, accuracy {last.get('accuracy', float('nan')):.2f}"
              f"{held_out}; checkpoint {out / 'latest'}")
    return 0
