"""`nanoseek speedrun`: the whole R1 pipeline in one offline command, with a report.

tokenizer and pretraining on the built-in corpus -> cold-start SFT -> GRPO -> rejection sampling and SFT
on the verified samples -> distillation of those samples into a dense student, and the same student trained
by GRPO alone for equal compute (spec grpo-r1.md §2.5, §2.7, §9.1). Every stage is `nanoseek` commands in
subprocesses, is evaluated on held-out problems, and leaves its directory, log and record under OUT; a stage
with a record is skipped on a rerun, so a failed run continues where it stopped. `report.md` gets the table
(stage, pass@1, cons@k, tokens/s, wall time), the plots and the cost projection.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from .report import plot_curves, read_metrics

TASK = "arithmetic"


@dataclass
class Plan:
    """Step counts and sizes of every stage; `--scale` multiplies the steps, `--tiny` is the CI size."""

    preset: str = "nano"
    # None: the preset's. The built-in arithmetic corpus yields 1,062 BPE tokens, and nano's two output heads (the
    # model's and the MTP module's) are half of its pretraining FLOPs at 4,096 rows, three quarters of them unused
    vocab_size: int | None = 1088
    corpus_docs: int = 40000
    pretrain_steps: int = 600
    sft_steps: int = 300
    sft_lr: float = 5e-4
    grpo_steps: int = 50
    grpo_prompts: int = 64  # prompts per GRPO step (micro-batches of 8)
    grpo_seeds: int = 3  # GRPO runs from the same SFT checkpoint; the first one continues the pipeline
    grpo_lr: float = 4e-5  # docs/grpo-nano.md: 1e-4 and above destroy the policy
    grpo_beta: float = 0.001  # R1's KL coefficient (spec grpo-r1.md §2.4)
    group_size: int = 8
    rejection_prompts: int = 400
    rejection_sft_steps: int = 300  # as many as the cold-start SFT: the two differ in their data only
    distill_steps: int = 200
    student_base_steps: int = 500  # near the teacher's 600: a student that solves some problems to start with
    rejection_mix: int = 2000  # cold-start conversations added to the sampled set (R1's stage 3 trains on a mix,
                               # spec grpo-r1.md §2.5)
    eval_problems: int = 400
    # sft and the GRPO seeds are evaluated on every held-out problem: the gain and the seed spread are a point or
    # two, and the sampling noise of 2000 problems is half that of 400
    seed_eval_problems: int = 2000
    eval_samples: int = 4
    max_tokens: int = 64
    seq_len: int = 256

    @classmethod
    def tiny(cls) -> Plan:
        return cls(preset="tiny", vocab_size=320, corpus_docs=600, pretrain_steps=6, sft_steps=150, sft_lr=3e-3,
                   grpo_steps=2, grpo_prompts=8, grpo_seeds=2, group_size=4, rejection_prompts=64,
                   rejection_sft_steps=3, rejection_mix=32, distill_steps=3, student_base_steps=4, eval_problems=8,
                   seed_eval_problems=8, eval_samples=2,
                   max_tokens=48, seq_len=128)

    def scaled(self, factor: float) -> Plan:
        steps = ("pretrain_steps", "sft_steps", "grpo_steps", "rejection_sft_steps", "distill_steps",
                 "student_base_steps")
        return Plan(**{**self.__dict__, **{s: max(1, round(getattr(self, s) * factor)) for s in steps}})


class StageFailed(RuntimeError):
    pass


@dataclass
class Stage:
    """A step of the pipeline: `nanoseek` commands run in order, built when the stage starts (they may read
    earlier stages' results), then, if `eval_problems`, held-out evaluation of OUT/name/latest."""

    name: str
    needs: tuple[str, ...]
    commands: Callable[[], list[list[str]]]
    eval_problems: int = 0


@dataclass
class Job:
    """A stage's training ("train") or its held-out evaluation ("eval"): what the scheduler starts."""

    stage: Stage
    kind: str


class Speedrun:
    """Runs the stages as `nanoseek` subprocesses in dependency order, up to `jobs` at once with the cores
    shared between them: sampling a small model (GRPO, evaluation) keeps a second thread only partly busy, so
    two one-thread processes do more of it than one two-thread process. A stage's training and its evaluation
    are separate jobs, since nothing waits on an evaluation. Each stage logs to OUT/name.log and records its
    result in OUT/name.json (after training, then with its scores): a rerun skips what a record says is done.
    """

    def __init__(self, out: Path, plan: Plan, seed: int = 0, device: str | None = None, jobs: int = 2):
        self.out, self.plan, self.seed, self.device, self.jobs = out, plan, seed, device, jobs
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.results: dict[str, dict] = {}

    # ---- the pipeline --------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        """R1's order (spec grpo-r1.md §2.5) and the distillation comparison of §2.7; the extra GRPO seeds
        come last, being needed by nothing but the report."""
        plan = self.plan
        latest = lambda name: str(self.out / name / "latest")  # noqa: E731
        traces = str(self.out / "rejection.jsonl")
        corpus = ["--corpus-tasks", TASK, "--corpus-max-difficulty", "2", "--corpus-docs", str(plan.corpus_docs),
                  "--seq-len", str(plan.seq_len)]
        vocab = ["--vocab-size", str(plan.vocab_size)] if plan.vocab_size else []
        chat = ["--batch-size", "16", "--seq-len", "96"]
        seeds = [f"grpo-seed{i}" for i in range(1, plan.grpo_seeds)]
        return [
            Stage("base", (), lambda: [self.train("pretrain", "base", plan.pretrain_steps, "--preset", plan.preset,
                                                  *corpus, *vocab)], plan.eval_problems),
            Stage("sft", ("base",), lambda: [self.train(
                "sft", "sft", plan.sft_steps, "--model", latest("base"), "--tasks", TASK, "--max-difficulty", "2",
                "--lr", str(plan.sft_lr), *chat)], plan.seed_eval_problems),
            Stage("student-base", ("base",), lambda: [self.train(
                "pretrain", "student-base", plan.student_base_steps, "--config", str(self.student_config()),
                "--tokenizer", latest("base"), *corpus)]),
            Stage("grpo", ("sft",), lambda: [self.grpo("grpo", "sft", plan.grpo_steps)], plan.seed_eval_problems),
            Stage("rejection", ("grpo",), lambda: [[
                "rejection-sample", "--model", latest("grpo"), "--out", traces, "--tasks", TASK, "--difficulties",
                "1,2", "--prompts", str(plan.rejection_prompts), "--samples", "4", "--max-tokens",
                str(plan.max_tokens), "--seed", str(self.seed)]]),
            Stage("rejection-sft", ("rejection",), lambda: [self.train(
                "sft", "rejection-sft", plan.rejection_sft_steps, "--model", latest("base"), "--data", traces,
                "--tasks", TASK, "--max-difficulty", "2", "--examples", str(plan.rejection_mix), *chat)],
                  plan.eval_problems),
            Stage("student-distill", ("rejection", "student-base"), lambda: [self.train(
                "distill", "student-distill", plan.distill_steps, "--student", latest("student-base"), "--data",
                traces, *chat)], plan.eval_problems),
            Stage("student-grpo", ("student-distill", "grpo"), lambda: [self.grpo(
                "student-grpo", "student-base", self.equal_compute_steps())], plan.eval_problems),
            *[Stage(name, ("sft",), lambda i=i, name=name: [self.grpo(name, "sft", plan.grpo_steps, self.seed + i)],
                    plan.seed_eval_problems) for i, name in enumerate(seeds, 1)],
        ]

    def train(self, command: str, name: str, steps: int, *options: str, seed: int | None = None) -> list[str]:
        return [command, "--out", str(self.out / name), "--max-steps", str(steps), "--save-every", str(steps),
                "--seed", str(self.seed if seed is None else seed), *options]

    def grpo(self, name: str, start: str, steps: int, seed: int | None = None) -> list[str]:
        """GRPO from OUT/start/latest in micro-batches of 8 prompts, with R1's KL term and no bias updates
        (the load balance stays as pretraining left it)."""
        plan = self.plan
        return self.train("grpo", name, steps, "--model", str(self.out / start / "latest"), "--tasks", TASK,
                          "--batch-size", "8", "--grad-accum", str(max(1, plan.grpo_prompts // 8)),
                          "--group-size", str(plan.group_size), "--temperature", "0.7", "--lr", str(plan.grpo_lr),
                          "--beta", str(plan.grpo_beta), "--warmup-steps", "0", "--max-new-tokens",
                          str(plan.max_tokens), "--bias-gamma", "0", "--eval-every", str(max(1, steps // 4)),
                          "--seq-len", str(plan.seq_len), seed=seed)

    def equal_compute_steps(self) -> int:
        """GRPO steps with the FLOPs the distillation spent: 6N per distilled token against 8N per GRPO token
        (2N to sample it, 6N to train on it; 2N more for the KL reference), at the teacher's GRPO tokens per step."""
        per_step = self.tokens_trained("grpo") / self.plan.grpo_steps
        per_token = 8 + 2 * (self.plan.grpo_beta > 0)
        return max(1, round(6 * self.tokens_trained("student-distill") / (per_token * per_step)))

    def student_config(self) -> Path:
        """The student's config.json: the nano-dense preset with the teacher's vocabulary and special ids."""
        from .checkpoint import read_config
        from .model.dense import DENSE_PRESETS, DenseConfig

        teacher = read_config(self.out / "base" / "latest" / "config.json")
        config = DenseConfig(**DENSE_PRESETS["nano-dense"], vocab_size=teacher.vocab_size,
                             bos_token_id=teacher.bos_token_id, eos_token_id=teacher.eos_token_id)
        path = self.out / "student-config.json"
        config.to_json_file(path)
        return path

    def tokens_trained(self, name: str) -> int:
        """Training tokens a stage processed, from its metrics (for tokens/s)."""
        metrics = self.out / name / "metrics.jsonl"
        if not metrics.exists():
            return 0
        rows = read_metrics(metrics)
        return int(sum(r.get("tokens", 0) for r in rows))

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
            if stage.eval_problems and "pass@1" not in self.results.get(stage.name, {}):
                jobs.append(Job(stage, "eval"))
            elif stage.name in self.results:
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
                ready = sorted((j for j in pending if self.is_ready(j)), key=lambda j: j.kind == "eval")
                starting = ready[: self.jobs - len(running)] if failure is None else []
                threads = max(1, self.cores // max(1, len(running) + len(starting)))
                for job in starting:
                    pending.remove(job)
                    print(f"[speedrun] {job.stage.name}: {'training' if job.kind == 'train' else 'evaluation'} "
                          f"... ({threads} thread{'s' * (threads > 1)}, log {self.out / job.stage.name}.log)",
                          flush=True)
                    running[pool.submit(self.execute, job, threads)] = job
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = running.pop(future)
                    try:
                        result = self.results[job.stage.name] = future.result()
                    except StageFailed as exc:
                        failure = failure or exc
                        continue
                    done = (f"trained in {result['wall_s'] / 60:.1f} min" if job.kind == "train" else
                            f"pass@1 {result['pass@1']:.1f}% on {result['eval_problems']} held-out problems")
                    print(f"[speedrun] {job.stage.name}: {done}", flush=True)
        if failure is not None:
            raise failure
        if pending:
            raise StageFailed(f"{', '.join(j.stage.name for j in pending)}: waiting on stages that are not in the run")

    def is_ready(self, job: Job) -> bool:
        if job.kind == "eval":
            return job.stage.name in self.results
        return all(name in self.results for name in job.stage.needs)

    def execute(self, job: Job, threads: int) -> dict:
        stage, env = job.stage, {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if job.kind == "eval":
            return self.record(stage.name, {**self.results[stage.name], **self.evaluate(stage, env)})
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

    def evaluate(self, stage: Stage, env: dict[str, str]) -> dict:
        plan, k = self.plan, self.plan.eval_samples
        report = self.out / f"{stage.name}.eval.json"
        started = time.time()
        self.call(stage.name, ["eval", "--model", str(self.out / stage.name / "latest"), "--tasks", TASK,
                               "--difficulties", "1", "--problems", str(stage.eval_problems), "--samples", str(k),
                               "--max-tokens", str(plan.max_tokens), "--seed", str(self.seed), "--json",
                               str(report)], env)
        scores = json.loads(report.read_text())["all"]
        return {"pass@1": scores["pass@1"], f"cons@{k}": scores[f"cons@{k}"], "eval_problems": stage.eval_problems,
                "eval_s": time.time() - started, "eval_finished": time.time()}

    # ---- the report ----------------------------------------------------------------------------
    def write_report(self) -> Path:
        plan, out, k = self.plan, self.out, self.plan.eval_samples
        rows = [f"| stage | pass@1 (%) | cons@{k} (%) | tokens/s | wall time |", "|---|---|---|---|---|"]
        for name in ("base", "sft", "grpo", "rejection-sft", "student-distill", "student-grpo"):
            r = self.results.get(name, {})
            speed = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
            threads = f", {r['threads']} thread{'s' * (r['threads'] > 1)}" if "threads" in r else ""
            rows.append(f"| {name} | {r.get('pass@1', float('nan')):.1f} | {r.get(f'cons@{k}', float('nan')):.1f} "
                        f"| {speed} | {r.get('wall_s', 0) / 60:.1f} min{threads} |")
        names = ["grpo", *(f"grpo-seed{i}" for i in range(1, plan.grpo_seeds))]
        runs = [self.results[n]["pass@1"] for n in names if n in self.results]
        spread = max(runs) - min(runs) if runs else float("nan")
        gain = sum(runs) / len(runs) - self.results.get("sft", {}).get("pass@1", float("nan")) if runs else \
            float("nan")
        seeds_line = (f"GRPO from the same SFT checkpoint with {len(runs)} seeds: pass@1 "
                      f"{' / '.join(f'{r:.1f}' for r in runs)}; mean gain over SFT {gain:+.1f} points, "
                      f"spread across seeds {spread:.1f} points.")
        records = [r for r in self.results.values() if "started" in r]
        total = (max(max(r["finished"], r.get("eval_finished", 0)) for r in records) -
                 min(r["started"] for r in records)) if records else 0.0
        busy = sum(r["wall_s"] for r in self.results.values())
        student_steps = len(read_metrics(out / "student-grpo" / "metrics.jsonl")) if self.results.get(
            "student-grpo") else 0
        lines = ["# nanoseek speedrun", "",
                 f"Held-out {TASK} problems of difficulty 1, {k} samples each at temperature 0.6, top-p 0.95 "
                 f"(pass@1 is the mean over samples): sft and the GRPO seeds on {plan.seed_eval_problems} problems, "
                 f"the other stages on {plan.eval_problems}. Student: a dense Qwen2-layout model with the teacher's "
                 "tokenizer, pretrained on the same corpus; `student-grpo` trains it by GRPO for the FLOPs the "
                 "distillation spent. Wall time is each stage's training; stages run two at a time, sharing "
                 "the cores.", "", *rows, "", seeds_line, "",
                 f"Total wall time: {total / 60:.1f} min with evaluations ({busy / 60:.1f} min of stage time, "
                 f"stages overlapping). student-grpo: {student_steps} GRPO steps.", "",
                 *[f"![{title}]({path.name})" for title, path in self.plots()], "", self.cost_line(), "",
                 "Chat with the result: `nanoseek chat --model " + str(out / "grpo" / "latest") + "`; serve it: "
                 "`nanoseek serve --model " + str(out / "grpo" / "latest") + "`."]
        report = out / "report.md"
        report.write_text("\n".join(lines) + "\n")
        return report

    def plots(self) -> list[tuple[str, Path]]:
        out = self.out
        made = []
        runs = {n: out / n / "metrics.jsonl" for n in ("base", "sft", "rejection-sft", "student-base",
                                                       "student-distill") if (out / n / "metrics.jsonl").exists()}
        if runs:
            made.append(("losses", plot_curves(runs, ["loss", "val_loss", "maxvio"], out / "losses.png",
                                               "training losses and expert load (MaxVio)", smooth=10)))
        names = ["grpo", *(f"grpo-seed{i}" for i in range(1, self.plan.grpo_seeds)), "student-grpo"]
        rl = {n: out / n / "metrics.jsonl" for n in names if (out / n / "metrics.jsonl").exists()}
        if rl:
            made.append(("grpo", plot_curves(rl, ["reward", "accuracy", "length_correct", "length_wrong", "kl",
                                                  "entropy", "zero_variance", "maxvio"], out / "grpo.png",
                                             "GRPO (trailing mean of 10 steps over the raw values)", smooth=10)))
        return made

    def cost_line(self) -> str:
        from .checkpoint import read_config
        from .sizing import parameter_counts
        from .train.loop import GPU_PEAK, V3_MFU

        counts = parameter_counts(read_config(self.out / "base" / "latest" / "config.json"))
        tokens = sum(self.tokens_trained(n) for n in ("base", "sft", "grpo", "rejection-sft"))
        flops = 6 * counts.activated * tokens
        hours = flops / (GPU_PEAK["h800"] * V3_MFU) / 3600
        return (f"Cost projection: {tokens:,} training tokens x 6 x {counts.activated / 1e6:.2f}M activated "
                f"parameters = {flops:.3g} FLOPs, {hours:.3g} H800-hours at DeepSeek-V3's {100 * V3_MFU:.0f}% "
                f"utilisation (${2 * hours:.3g} at $2/GPU-hour, the V3 paper's rate).")


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
    plan = (Plan.tiny() if args.tiny else Plan()).scaled(args.scale)
    speedrun = Speedrun(Path(args.out), plan, args.seed, args.device, args.jobs)
    try:
        report = speedrun.run()
    except StageFailed as exc:
        print(f"[speedrun] stopped: {exc}. Finished stages are kept in {args.out}; rerun to continue.", flush=True)
        return 1
    print((report.read_text().split("\n\n")[2]) if report.exists() else "", flush=True)
    print(f"[speedrun] report: {report}\nChat: nanoseek chat --model {args.out}/grpo/latest\n"
          f"Serve: nanoseek serve --model {args.out}/grpo/latest", flush=True)
    return 0
