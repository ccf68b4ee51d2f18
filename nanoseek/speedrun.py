"""`nanoseek speedrun`: the two recipes of the R1 paper on one pretrained base, in one offline command.

* R1-Zero (DeepSeek-R1 §2.1): GRPO straight from the pretrained base with rule-based rewards (accuracy and a
  format reward that treats a direct and a reasoned reply alike), in a prompt layout the base saw in
  pretraining, nothing prefilled. Three seeds, and two controls that must stay flat: a random reward
  (Shao et al., "Spurious Rewards"), and the same pretraining with no reasoning under the layout.
* R1 (§2.3): cold-start SFT in the chat layout -> reasoning GRPO -> rejection sampling -> SFT of the base
  on the verified samples; and distillation of those samples into a dense student against the student
  trained by R1-Zero's RL alone (§2.4, Table 6).

The task is `trace` (a program on three registers; a direct answer is a 0.1% guess, a worked one a chain of
lookups), evaluated on held-out problems of one level with 4.1 million distinct questions. Every stage is
`nanoseek` commands in a subprocess and leaves its directory, log and record (OUT/STAGE.json) under OUT; a
stage with a record is skipped on a rerun, so a failed run continues where it stopped. `report.md` gets the
tables, the plots and the cost projection; `r1-zero/summary.json` the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import read_config, weights_sha256
from .config import DenseConfig, preset
from .report import plot_curves, plot_pass_at_k, read_metrics
from .sizing import parameter_counts
from .tasks import evaluation_questions, question_space
from .tokenizer import BOS, EOS, SPECIAL_TOKENS
from .train.config import GPU_PEAK, V3_MFU

TASK, LEVEL = "trace", 1
R1_ROWS = ["base", "sft", "grpo", "rejection-sft", "student-distill", "student-grpo"]
MIN_QUESTIONS = 10 ** 6  # no headline on a level a model could memorise


@dataclass
class Plan:
    """Step counts and sizes of every stage; `--scale` multiplies the steps, `--tiny` is the CI size."""

    preset: str = "micro"
    vocab_size: int | None = 320  # the trace corpus fills 320 rows; unused rows would still cost FLOPs
    corpus_docs: int = 60000
    anneal_docs: int = 20000  # more than the anneal reads: it samples each document about once
    template_share: float = 0.2  # trunk documents in the assistant's layout; the rest are the teacher's
    trunk_steps: int = 1200  # the shared trunk, at a constant learning rate, with no reasoning in the layout
    anneal_steps: int = 200  # each base's decay phase, on its own mix
    anneal_template_share: float = 0.5
    think_share: float = 0.15  # of the anneal's assistant replies, those that reason: what RL can select
    pretrain_lr: float = 3e-3
    zero_steps: int = 24
    zero_prompts: int = 16
    zero_lr: float = 3e-4
    zero_seeds: int = 3
    group_size: int = 8
    sft_steps: int = 100
    sft_lr: float = 1e-3
    grpo_steps: int = 24
    grpo_lr: float = 1e-4
    rejection_prompts: int = 400
    rejection_sft_steps: int = 100
    rejection_mix: int = 1000  # cold-start conversations added to the samples (R1 stage 3 trains on a mix)
    student_steps: int = 1400  # the teacher's pretraining budget (trunk and anneal)
    distill_steps: int = 100
    eval_problems: int = 1000
    eval_samples: int = 4
    curve_problems: int = 250
    curve_samples: int = 16
    max_tokens: int = 64  # 1.4x a worked reply (46 tokens): truncation would punish reasoning
    seq_len: int = 128
    batch_size: int = 16

    @classmethod
    def tiny(cls) -> Plan:
        return cls(preset="tiny", vocab_size=320, corpus_docs=600, anneal_docs=300, trunk_steps=6, anneal_steps=2,
                   zero_steps=2, zero_prompts=8, zero_seeds=2, group_size=4, sft_steps=3, grpo_steps=2,
                   rejection_prompts=16,
                   rejection_sft_steps=3, rejection_mix=16, student_steps=4, distill_steps=3, eval_problems=8,
                   eval_samples=2, curve_problems=4, curve_samples=4, batch_size=8)

    def scaled(self, factor: float) -> Plan:
        steps = ("trunk_steps", "anneal_steps", "zero_steps", "sft_steps", "grpo_steps", "rejection_sft_steps",
                 "student_steps", "distill_steps")
        return Plan(**{**self.__dict__, **{s: max(1, round(getattr(self, s) * factor)) for s in steps}})


class StageFailed(RuntimeError):
    pass


@dataclass
class Stage:
    """A step of the pipeline: `nanoseek` commands run in order, built when the stage starts (they may read
    earlier stages' results), then, if `template`, held-out evaluation of OUT/name/latest in that layout
    (and with `curve`, pass@k for k up to `curve_samples` at temperature 1)."""

    name: str
    needs: tuple[str, ...]
    commands: Callable[[], list[list[str]]]
    template: str | None = None
    curve: bool = False


@dataclass
class Job:
    """What the scheduler starts: a stage's training ("train"), its evaluation ("eval") or its pass@k curve
    ("curve")."""

    stage: Stage
    kind: str

    @property
    def done_key(self) -> str:
        return {"eval": "pass@1", "curve": "curve"}[self.kind]


class Speedrun:
    """Runs the stages as `nanoseek` subprocesses in dependency order, up to `jobs` at once with the cores
    shared between them: sampling a small model keeps a second thread only partly busy, so two one-thread
    processes do more than one two-thread process. A stage's evaluations are separate jobs, since nothing
    waits on them. Each stage logs to OUT/name.log and records its result in OUT/name.json (after training,
    then with its scores): a rerun skips what a record says is done."""

    def __init__(self, out: Path, plan: Plan, seed: int = 0, device: str | None = None, jobs: int = 2):
        self.out, self.plan, self.seed, self.device, self.jobs = out, plan, seed, device, jobs
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.results: dict[str, dict] = {}
        self.lock = threading.Lock()

    # ---- the pipeline --------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        """The trunk and the student's pretraining first, then whatever is ready, longest chains early; the
        extra seeds and the controls are needed by nothing but the report."""
        plan = self.plan
        latest = lambda name: str(self.out / name / "latest")  # noqa: E731
        traces = str(self.out / "rejection.jsonl")
        # R1's stage-3 SFT set, on which the base is fine-tuned and the student distilled: the verified samples
        # and a mix of other data (here cold-start worked solutions)
        stage3 = ["--data", traces, "--tasks", TASK, "--max-difficulty", str(LEVEL), "--examples",
                  str(plan.rejection_mix)]
        chat = ["--batch-size", "16", "--seq-len", "96"]
        seeds = self.zero_runs()[1:]
        return [
            Stage("trunk", (), lambda: [self.pretrain("trunk")]),
            Stage("student-base", (), lambda: [self.train(
                "pretrain", "student-base", plan.student_steps, "--model-config", str(self.student_config()),
                *self.corpus(plan.template_share, plan.think_share), "--schedule", "cosine")]),
            Stage("base", ("trunk",), lambda: [self.anneal("base", plan.think_share)], "zero", curve=True),
            Stage("base-nothink", ("trunk",), lambda: [self.anneal("base-nothink", 0.0)], "zero"),
            Stage("zero", ("base",), lambda: [self.zero("zero", "base")], "zero", curve=True),
            Stage("sft", ("base",), lambda: [self.train(
                "sft", "sft", plan.sft_steps, "--model", latest("base"), "--tasks", TASK, "--max-difficulty",
                str(LEVEL), "--lr", str(plan.sft_lr), *chat)], "chat"),
            Stage("grpo", ("sft",), lambda: [self.grpo("grpo", "sft")], "chat"),
            Stage("rejection", ("grpo",), lambda: [[
                "rejection-sample", "--model", latest("grpo"), "--out", traces, "--tasks", TASK, "--difficulties",
                str(LEVEL), "--prompts", str(plan.rejection_prompts), "--samples", "4", "--max-tokens",
                str(plan.max_tokens), "--seed", str(self.seed)]]),
            Stage("rejection-sft", ("rejection",), lambda: [self.train(
                "sft", "rejection-sft", plan.rejection_sft_steps, "--model", latest("base"), *stage3,
                "--lr", str(plan.sft_lr), *chat)], "chat"),
            Stage("student-distill", ("rejection", "student-base"), lambda: [self.train(
                "distill", "student-distill", plan.distill_steps, "--student", latest("student-base"), *stage3,
                "--lr", str(plan.sft_lr), *chat)], "chat"),
            Stage("student-grpo", ("student-base",), lambda: [self.zero("student-grpo", "student-base")], "zero"),
            Stage("zero-random", ("base",), lambda: [self.zero("zero-random", "base", rewards="random=1,format=0.1")],
                  "zero"),
            Stage("zero-nothink", ("base-nothink",), lambda: [self.zero("zero-nothink", "base-nothink")], "zero"),
            *[Stage(name, ("base",), lambda i=i, name=name: [self.zero(name, "base", self.seed + i)], "zero")
              for i, name in enumerate(seeds, 1)],
        ]

    def train(self, command: str, name: str, steps: int, *options: str, seed: int | None = None) -> list[str]:
        return [command, "--out", str(self.out / name), "--max-steps", str(steps), "--save-every", str(steps),
                "--seed", str(self.seed if seed is None else seed), *options]

    def corpus(self, template_share: float, think_share: float, documents: int | None = None) -> list[str]:
        """The built-in corpus of the trace task at the evaluated level, and the pretraining batch shape."""
        plan = self.plan
        return ["--corpus-tasks", TASK, "--corpus-min-difficulty", str(LEVEL), "--corpus-max-difficulty",
                str(LEVEL), "--corpus-docs", str(documents or plan.corpus_docs), "--corpus-template-share",
                str(template_share), "--corpus-think-share", str(think_share), "--seq-len", str(plan.seq_len),
                "--batch-size", str(plan.batch_size), "--lr", str(plan.pretrain_lr), "--eval-every", "100"]

    def pretrain(self, name: str) -> list[str]:
        """The trunk: the corpus with no reasoning under the zero layout (the step skill is learned from the
        textbook documents), at a constant learning rate, the stable phase of a WSD schedule."""
        vocab = ["--vocab-size", str(self.plan.vocab_size)] if self.plan.vocab_size else []
        return self.train("pretrain", name, self.plan.trunk_steps, "--preset", self.plan.preset,
                          *self.corpus(self.plan.template_share, 0.0), *vocab, "--schedule", "wsd",
                          "--decay-fraction", "0")

    def anneal(self, name: str, think_share: float) -> list[str]:
        """A base: the trunk's decay phase on new documents of its own mix. The two bases draw the same documents
        (one seed) and differ only in whether `think_share` of the zero-layout replies reason."""
        return self.train("pretrain", name, self.plan.anneal_steps, "--init", str(self.out / "trunk" / "latest"),
                          *self.corpus(self.plan.anneal_template_share, think_share, self.plan.anneal_docs),
                          "--schedule", "wsd",
                          "--decay-fraction", "1", "--warmup-steps", "0", seed=self.seed + 1)

    def zero(self, name: str, start: str, seed: int | None = None, rewards: str = "accuracy=1,format=0.1"
             ) -> list[str]:
        """R1-Zero's RL from OUT/start/latest: the zero layout, Dr. GRPO at temperature 1 (no std scaling, a
        constant normaliser: no length bias), no KL, one update per batch (so no clipping bias)."""
        plan = self.plan
        return self.train("grpo", name, plan.zero_steps, "--model", str(self.out / start / "latest"), "--tasks",
                          TASK, "--difficulties", str(LEVEL), "--template", "zero", "--loss-type", "dr_grpo",
                          "--no-scale-rewards", "--reward-weights", rewards, "--temperature", "1.0",
                          "--group-size", str(plan.group_size), "--batch-size", "8", "--grad-accum",
                          str(max(1, plan.zero_prompts // 8)), "--lr", str(plan.zero_lr), "--warmup-steps", "0",
                          "--max-new-tokens", str(plan.max_tokens), "--bias-gamma", "0", "--eval-every",
                          str(max(1, plan.zero_steps // 4)), "--seq-len", str(plan.seq_len), seed=seed)

    def grpo(self, name: str, start: str) -> list[str]:
        """The R1 path's reasoning RL from OUT/start/latest in the chat layout, with R1's KL term."""
        plan = self.plan
        return self.train("grpo", name, plan.grpo_steps, "--model", str(self.out / start / "latest"), "--tasks",
                          TASK, "--difficulties", str(LEVEL), "--template", "chat", "--batch-size", "8",
                          "--grad-accum", str(max(1, plan.zero_prompts // 8)), "--group-size", str(plan.group_size),
                          "--temperature", "1.0", "--lr", str(plan.grpo_lr), "--beta", "0.001", "--warmup-steps",
                          "0", "--max-new-tokens", str(plan.max_tokens), "--bias-gamma", "0", "--eval-every",
                          str(max(1, plan.grpo_steps // 4)), "--seq-len", str(plan.seq_len))

    def student_config(self) -> Path:
        """The student's config.json: a dense Qwen2-layout model of the teacher's width and depth (R1-Distill's
        family), with the teacher's vocabulary and the special ids nanoseek's tokenizers have."""
        teacher = preset(self.plan.preset, **({"vocab_size": self.plan.vocab_size} if self.plan.vocab_size else {}))
        config = DenseConfig(model_type="qwen2", hidden_size=teacher.hidden_size,
                             intermediate_size=teacher.intermediate_size, num_hidden_layers=teacher.num_hidden_layers,
                             num_attention_heads=teacher.num_attention_heads, num_key_value_heads=2,
                             max_position_embeddings=teacher.max_position_embeddings, tie_word_embeddings=True,
                             vocab_size=teacher.vocab_size, bos_token_id=SPECIAL_TOKENS.index(BOS),
                             eos_token_id=SPECIAL_TOKENS.index(EOS))
        path = self.out / "student-config.json"
        config.to_json_file(path)
        return path

    def tokens_trained(self, name: str) -> int:
        """Training tokens a stage processed, from its metrics (for tokens/s)."""
        metrics = self.out / name / "metrics.jsonl"
        if not metrics.exists():
            return 0
        return int(sum(r.get("tokens", 0) for r in read_metrics(metrics)))

    # ---- running stages ------------------------------------------------------------------------
    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        jobs = []
        for stage in self.stages():
            record = self.out / f"{stage.name}.json"
            if record.exists():
                self.results[stage.name] = json.loads(record.read_text())
            else:
                jobs.append(Job(stage, "train"))
            for kind in ("eval", "curve") if stage.template else ():
                job = Job(stage, kind)
                if (kind == "eval" or stage.curve) and job.done_key not in self.results.get(stage.name, {}):
                    jobs.append(job)
            if stage.name in self.results and not any(j.stage is stage for j in jobs):
                print(f"[speedrun] {stage.name}: done before, skipped", flush=True)
        self.schedule(jobs)
        return self.write_report()

    def schedule(self, pending: list[Job]) -> None:
        """Start every job whose inputs are done, up to `jobs` at once, training before evaluation (nothing
        waits on an evaluation); after a failure start nothing more, let the running jobs end, then raise it."""
        failure: StageFailed | None = None
        running: dict[Future, Job] = {}
        with ThreadPoolExecutor(self.jobs) as pool:
            while True:
                ready = sorted((j for j in pending if self.is_ready(j)), key=lambda j: j.kind != "train")
                starting = ready[: self.jobs - len(running)] if failure is None else []
                threads = max(1, self.cores // max(1, len(running) + len(starting)))
                for job in starting:
                    pending.remove(job)
                    print(f"[speedrun] {job.stage.name}: {'training' if job.kind == 'train' else job.kind} "
                          f"... ({threads} thread{'s' * (threads > 1)}, log {self.out / job.stage.name}.log)",
                          flush=True)
                    running[pool.submit(self.execute, job, threads)] = job
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = running.pop(future)
                    try:
                        result = future.result()  # record() has stored it
                    except StageFailed as exc:
                        failure = failure or exc
                        continue
                    print(f"[speedrun] {job.stage.name}: {self.done_line(job, result)}", flush=True)
        if failure is not None:
            raise failure
        if pending:
            raise StageFailed(f"{', '.join(j.stage.name for j in pending)}: waiting on stages that are not in the run")

    @staticmethod
    def done_line(job: Job, result: dict) -> str:
        if job.kind == "train":
            return f"trained in {result['wall_s'] / 60:.1f} min"
        if job.kind == "curve":
            return f"pass@{max(map(int, result['curve']))} {max(result['curve'].values()):.1f}% at temperature 1"
        return (f"pass@1 {result['pass@1']:.1f}%, reasoning {result['reasoning_share']:.0f}%, "
                f"{result['mean_length']:.0f} tokens on {result['eval_problems']} held-out problems")

    def is_ready(self, job: Job) -> bool:
        if job.kind != "train":
            return job.stage.name in self.results
        return all(name in self.results for name in job.stage.needs)

    def execute(self, job: Job, threads: int) -> dict:
        stage, env = job.stage, {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if job.kind != "train":
            scores = self.evaluate(stage, env, job.kind)
            with self.lock:  # a stage's evaluation and its curve may finish together: merge into the latest
                return self.record(stage.name, {**self.results[stage.name], **scores})
        started = time.time()
        for argv in stage.commands():
            self.call(stage.name, argv, env)
        finished = time.time()
        tokens = self.tokens_trained(stage.name)
        return self.record(stage.name, {"wall_s": finished - started, "tokens_per_s": tokens / (finished - started)
                                        if tokens else None, "threads": threads, "started": started,
                                        "finished": finished})

    def record(self, name: str, result: dict) -> dict:
        """OUT/name.json, replaced whole: it marks the stage trained, and evaluated once it has pass@1."""
        self.results[name] = result
        record = self.out / f"{name}.json"
        partial = record.with_suffix(".json.partial")
        partial.write_text(json.dumps(result, indent=2) + "\n")
        partial.replace(record)
        return result

    def call(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        """One `nanoseek` command in a subprocess, its output appended to the stage's log."""
        if "--out" in argv and (Path(argv[argv.index("--out") + 1]) / "latest").exists():
            argv = [*argv, "--resume"]  # an interrupted stage continues from its last checkpoint
        command = [sys.executable, "-m", "nanoseek", *argv, *(["--device", self.device] if self.device else [])]
        log = self.out / f"{name}.log"
        with open(log, "a") as stream:
            stream.write(f"$ nanoseek {' '.join(argv)}\n")
            stream.flush()
            code = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env).returncode
        if code:
            lines = [line for line in log.read_text().replace("\r", "\n").splitlines() if line.strip()]
            raise StageFailed(f"stage {name}: `nanoseek {' '.join(argv)}` exited with {code}; the end of {log}:\n"
                              + "\n".join(lines[-12:]))

    def evaluate(self, stage: Stage, env: dict[str, str], kind: str) -> dict:
        """R1's protocol on the held-out problems (temperature 0.6, top-p 0.95, k samples), or the pass@k
        curve at temperature 1."""
        plan = self.plan
        curve = kind == "curve"
        report = self.out / f"{stage.name}.{kind}.json"
        problems, samples = (plan.curve_problems, plan.curve_samples) if curve else (plan.eval_problems,
                                                                                      plan.eval_samples)
        started = time.time()
        self.call(stage.name, ["eval", "--model", str(self.out / stage.name / "latest"), "--tasks", TASK,
                               "--difficulties", str(LEVEL), "--problems", str(problems), "--samples", str(samples),
                               "--max-tokens", str(plan.max_tokens), "--template", stage.template or "chat",
                               "--seed", str(self.seed), "--json", str(report),
                               *(["--temperature", "1.0", "--top-p", "1.0", "--curve"] if curve else [])], env)
        scores = json.loads(report.read_text())
        if curve:
            return {"curve": scores["all"]["pass@k_curve"], "curve_s": time.time() - started}
        keep = ("pass@1", f"cons@{samples}", "reasoning_share", "mean_length", "length_reasoning", "length_direct",
                "accuracy_reasoning", "accuracy_direct", "truncated")
        return {**{k: scores["all"][k] for k in keep}, "first_token_entropy": scores["first_token_entropy"],
                "eval_problems": problems, "eval_s": time.time() - started, "eval_finished": time.time()}

    # ---- the report ----------------------------------------------------------------------------
    def write_report(self) -> Path:
        summary = self.summary()
        folder = self.out / "r1-zero"
        folder.mkdir(exist_ok=True)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        lines = ["# nanoseek speedrun", "", self.protocol_line(), "", "## R1-Zero: RL from the pretrained base", "",
                 *self.table(["base", *self.zero_runs(), "zero-random", "base-nothink", "zero-nothink"]), "",
                 *self.zero_lines(summary), "",
                 "## The R1 path from the same base, and distillation", "", *self.table(R1_ROWS), "",
                 self.wall_line(), "", *[f"![{title}]({path.name})" for title, path in self.plots()], "",
                 self.cost_line(), "", "Chat with the R1-path model: `nanoseek chat --model "
                 f"{self.out / 'grpo' / 'latest'}`; serve it: `nanoseek serve --model {self.out / 'grpo' / 'latest'}`."]
        report = self.out / "report.md"
        report.write_text("\n".join(lines) + "\n")
        return report

    def protocol_line(self) -> str:
        plan, space, held_out = self.plan, question_space(TASK, LEVEL), len(evaluation_questions(TASK, LEVEL))
        return (f"Held-out `{TASK}` problems of level {LEVEL} ({LEVEL + 5} operations; {space:,} distinct questions, "
                f"{held_out:,} of them held out: {100 * held_out / space:.3f}%, none in any training "
                f"source): {plan.eval_problems} problems, {plan.eval_samples} samples each at temperature 0.6, top-p "
                "0.95 (pass@1 is the mean over samples). A reply reasons when its think block holds the task's step "
                "lines; length is in tokens. Each stage is evaluated in the layout it was trained in: `zero` (User: "
                "... Assistant:, nothing prefilled) or `chat` (the chat template, which opens the think block).")

    def table(self, rows: list[str]) -> list[str]:
        k = self.plan.eval_samples
        lines = [f"| stage | pass@1 (%) | cons@{k} (%) | reasoning (%) | length | accuracy reasoning / direct (%) "
                 "| wall time |", "|---|---|---|---|---|---|---|"]
        for name in rows:
            r = self.results.get(name)
            if r is None or "pass@1" not in r:
                continue
            threads = f", {r['threads']} thread{'s' * (r['threads'] > 1)}" if "threads" in r else ""
            lines.append(f"| {name} | {r['pass@1']:.1f} | {r[f'cons@{k}']:.1f} | {r['reasoning_share']:.1f} | "
                         f"{r['mean_length']:.1f} | {r['accuracy_reasoning']:.1f} / {r['accuracy_direct']:.1f} | "
                         f"{r.get('wall_s', 0) / 60:.1f} min{threads} |")
        return lines

    def zero_lines(self, summary: dict) -> list[str]:
        """The headline in words: the evaluated seeds against the base, then the controls."""
        seeds = [(p, r, n) for p, r, n in zip(summary["zero_pass1"], summary["zero_reasoning_share"],
                                               summary["zero_mean_length"], strict=True) if None not in (p, r, n)]
        base = summary["base_pass1"]
        if not seeds or base is None:
            return []
        runs = [p for p, _, _ in seeds]
        gain, spread = sum(runs) / len(runs) - base, max(runs) - min(runs)
        same = summary["start_checkpoint_sha256"] == summary["base_checkpoint_sha256"]
        digest = (summary["base_checkpoint_sha256"] or "")[:16]
        lines = [f"R1-Zero from the base with {len(runs)} seeds: pass@1 {' / '.join(f'{r:.1f}' for r in runs)} "
                 f"against the base's {base:.1f}; mean gain {_signed(gain)} points, spread across seeds "
                 f"{spread:.1f} points. Reasoning share {' / '.join(f'{r:.0f}' for _, r, _ in seeds)}% (base "
                 f"{summary['base_reasoning_share']:.0f}%), mean length {' / '.join(f'{n:.1f}' for _, _, n in seeds)} "
                 f"tokens (base {summary['base_mean_length']:.1f}). The zero stage started from the base's own "
                 f"weights: {'the same' if same else 'NOT the same'} SHA-256 ({digest}...).", ""]
        nothink_base = summary["no_reasoning_corpus_base_pass1"]
        nothink_base = "not measured" if nothink_base is None else f"{nothink_base:.1f}"
        for name, label in (("zero-random", "random reward (a coin flip per reply, the format term kept)"),
                            ("zero-nothink", "no reasoning under the layout in pretraining (base-nothink's "
                             f"pass@1: {nothink_base})")):
            r = self.results.get(name, {})
            if "pass@1" in r:
                lines.append(f"Control, {label}: pass@1 {r['pass@1']:.1f} ({_signed(r['pass@1'] - base)} against "
                             f"the base), reasoning share {r['reasoning_share']:.0f}%.")
        return lines

    def wall_line(self) -> str:
        records = [r for r in self.results.values() if "started" in r]
        if not records:
            return ""
        ends = [max(r["finished"], r.get("eval_finished", 0)) for r in records]
        total = max(ends) - min(r["started"] for r in records)
        busy = sum(r["wall_s"] for r in self.results.values())
        student = len(read_metrics(self.out / "student-grpo" / "metrics.jsonl")) if self.results.get(
            "student-grpo") else 0
        return (f"Total wall time: {total / 60:.1f} min with evaluations ({busy / 60:.1f} min of stage time, stages "
                f"overlapping). The student (a dense Qwen2-layout model of the teacher's size and tokenizer, "
                f"pretrained on the same corpus) is distilled on the verified samples of the R1 path's GRPO model, or "
                f"trained by R1-Zero's RL alone for as many steps as the teacher's zero run ({student} steps).")

    def zero_runs(self) -> list[str]:
        """The zero stage's runs, one per seed."""
        return ["zero", *(f"zero-seed{i}" for i in range(1, self.plan.zero_seeds))]

    def summary(self) -> dict:
        """The R1-Zero headline, from the stages' records (pass@1 and shares in percent, lengths in tokens)."""
        zero = self.zero_runs()
        get = lambda name, key: self.results.get(name, {}).get(key)  # noqa: E731
        start = self.out / "zero" / "start.json"
        base = self.out / "base" / "latest"
        return {
            "task": TASK, "level": LEVEL, "eval_problems": self.plan.eval_problems,
            "distinct_questions": question_space(TASK, LEVEL),
            "held_out_share": len(evaluation_questions(TASK, LEVEL)) / question_space(TASK, LEVEL),
            "samples": self.plan.eval_samples, "temperature": 0.6, "top_p": 0.95,
            "base_pass1": get("base", "pass@1"), "zero_pass1": [get(n, "pass@1") for n in zero],
            "base_reasoning_share": get("base", "reasoning_share"),
            "zero_reasoning_share": [get(n, "reasoning_share") for n in zero],
            "base_mean_length": get("base", "mean_length"), "zero_mean_length": [get(n, "mean_length") for n in zero],
            "random_reward_pass1": get("zero-random", "pass@1"),
            "random_reward_reasoning_share": get("zero-random", "reasoning_share"),
            "no_reasoning_corpus_base_pass1": get("base-nothink", "pass@1"),
            "no_reasoning_corpus_pass1": get("zero-nothink", "pass@1"),
            "no_reasoning_corpus_reasoning_share": get("zero-nothink", "reasoning_share"),
            "start_checkpoint_sha256": json.loads(start.read_text())["sha256"] if start.exists() else None,
            "base_checkpoint_sha256": weights_sha256(base) if base.exists() else None,
        }

    def plots(self) -> list[tuple[str, Path]]:
        out = self.out
        made = []
        metrics = lambda names: {n: out / n / "metrics.jsonl" for n in names  # noqa: E731
                                 if (out / n / "metrics.jsonl").exists()}
        zero = metrics([*self.zero_runs(), "zero-random", "zero-nothink", "student-grpo"])
        if zero:
            made.append(("r1-zero", plot_curves(zero, [
                "accuracy", "val_pass1", "reasoning_share", "length", "length_reasoning", "length_direct",
                "first_token_entropy", "truncated", "zero_variance"], out / "r1-zero.png",
                "R1-Zero: GRPO from the base (sampled at temperature 1; val_*: held-out, temperature 0.6)",
                smooth=5)))
        curves = {n: self.results[n]["curve"] for n in ("base", "zero") if "curve" in self.results.get(n, {})}
        if curves:
            made.append(("pass@k", plot_pass_at_k(curves, out / "pass-at-k.png",
                                                  "held-out pass@k at temperature 1: base and R1-Zero (seed 0)")))
        runs = metrics(["trunk", "base", "base-nothink", "sft", "rejection-sft", "student-base", "student-distill"])
        if runs:
            made.append(("losses", plot_curves(runs, ["loss", "val_loss", "maxvio"], out / "losses.png",
                                               "training losses and expert load (MaxVio)", smooth=10)))
        rl = metrics(["grpo"])
        if rl:
            made.append(("grpo", plot_curves(rl, ["reward", "accuracy", "val_pass1", "length", "kl", "entropy"],
                                             out / "grpo.png", "the R1 path's GRPO after cold-start SFT", smooth=5)))
        return made

    def cost_line(self) -> str:
        counts = parameter_counts(read_config(self.out / "base" / "latest" / "config.json"))
        tokens = sum(self.tokens_trained(n) for n in ("trunk", "base", "zero"))
        flops = 6 * counts.activated * tokens
        hours = flops / (GPU_PEAK["h800"] * V3_MFU) / 3600
        return (f"Cost projection of R1-Zero (the base's pretraining and one zero run): {tokens:,} training "
                f"tokens x 6 x {counts.activated / 1e6:.2f}M activated parameters = {flops:.3g} FLOPs, {hours:.3g} "
                f"H800-hours at DeepSeek-V3's {100 * V3_MFU:.0f}% utilisation (${2 * hours:.3g} at $2/GPU-hour, the "
                "V3 paper's rate).")


def _signed(points: float) -> str:
    """A difference in points with its sign, and no "-0.0" for a difference that rounds to nothing."""
    return f"{round(points, 1) + 0.0:+.1f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/speedrun")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (a GPU: 10 or more)")
    parser.add_argument("--tiny", action="store_true", help="the CI size: every stage end to end in a few minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--jobs", type=int, default=2, help="stages run at once (the cores are shared between them)")


def run(args: argparse.Namespace) -> int:
    if not args.scale > 0:
        raise ValueError(f"--scale = {args.scale}: must be > 0")
    if args.jobs < 1:
        raise ValueError(f"--jobs = {args.jobs}: must be >= 1")
    if question_space(TASK, LEVEL) < MIN_QUESTIONS:
        raise ValueError(f"{TASK} level {LEVEL} has {question_space(TASK, LEVEL):,} distinct questions; a "
                         f"headline needs {MIN_QUESTIONS:,}")
    plan = (Plan.tiny() if args.tiny else Plan()).scaled(args.scale)
    speedrun = Speedrun(Path(args.out), plan, args.seed, args.device, args.jobs)
    try:
        report = speedrun.run()
    except StageFailed as exc:
        print(f"[speedrun] stopped: {exc}. Finished stages are kept in {args.out}; rerun to continue.", flush=True)
        return 1
    print(f"[speedrun] report: {report}; headline: {args.out}/r1-zero/summary.json\n"
          f"Chat: nanoseek chat --model {args.out}/grpo/latest\nServe: nanoseek serve --model {args.out}/grpo/latest",
          flush=True)
    return 0
