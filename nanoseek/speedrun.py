"""`nanoseek speedrun`: the whole R1 pipeline in one offline command, with a report.

tokenizer and pretraining on the built-in corpus -> cold-start SFT -> GRPO -> rejection sampling and SFT
on the verified samples -> distillation of those samples into a dense student, and the same student trained
by GRPO alone for equal compute (spec grpo-r1.md §2.5, §2.7, §9.1). Every stage is a `nanoseek` command run
in this process, is evaluated on held-out problems, and leaves its directory under OUT; a stage whose
`stage.json` exists is skipped on a rerun, so a failed run continues where it stopped. `report.md` gets
the table (stage, pass@1, cons@k, tokens/s, wall time), the plots and the cost projection.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .engine import LLM
from .eval import evaluate
from .report import plot_curves, read_metrics
from .tasks import make_problem

TASK = "arithmetic"


@dataclass
class Plan:
    """Step counts and sizes of every stage; `--scale` multiplies the steps, `--tiny` is the CI size."""

    preset: str = "nano"
    vocab_size: int | None = None  # None: the preset's
    corpus_docs: int = 40000
    pretrain_steps: int = 600
    sft_steps: int = 300
    sft_lr: float = 5e-4
    grpo_steps: int = 100
    grpo_prompts: int = 32  # prompts per GRPO step (micro-batches of 8)
    grpo_seeds: int = 3  # GRPO runs from the same SFT checkpoint; the first one continues the pipeline
    grpo_lr: float = 2e-5  # docs/grpo-nano.md: 1e-4 and above destroy the policy, 3e-5 and below barely move it
    group_size: int = 8
    rejection_prompts: int = 400
    rejection_sft_steps: int = 200
    distill_steps: int = 200
    student_base_steps: int = 400
    eval_problems: int = 400
    eval_samples: int = 4
    max_tokens: int = 64
    seq_len: int = 256

    @classmethod
    def tiny(cls) -> Plan:
        return cls(preset="tiny", vocab_size=320, corpus_docs=600, pretrain_steps=6, sft_steps=150, sft_lr=3e-3,
                   grpo_steps=2, grpo_prompts=8, grpo_seeds=2, group_size=4, rejection_prompts=64,
                   rejection_sft_steps=3, distill_steps=3, student_base_steps=4, eval_problems=8, eval_samples=2,
                   max_tokens=48, seq_len=128)

    def scaled(self, factor: float) -> Plan:
        steps = ("pretrain_steps", "sft_steps", "grpo_steps", "rejection_sft_steps", "distill_steps",
                 "student_base_steps")
        return Plan(**{**self.__dict__, **{s: max(1, round(getattr(self, s) * factor)) for s in steps}})


class StageFailed(RuntimeError):
    pass


class Speedrun:
    def __init__(self, out: Path, plan: Plan, seed: int = 0, device: str | None = None):
        self.out, self.plan, self.seed, self.device = out, plan, seed, device
        self.results: dict[str, dict] = {}

    # ---- running stages ------------------------------------------------------------------------
    def command(self, name: str, argv: list[str]) -> None:
        from .cli import build_parser

        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
        if argv[0] != "rejection-sample" and out is not None and (out / "latest").exists():
            argv = [*argv, "--resume"]  # an interrupted stage continues from its last checkpoint
        args = build_parser().parse_args(argv + (["--device", self.device] if self.device else []))
        try:
            code = args.func(args)
        except (ValueError, OSError, RuntimeError) as exc:
            raise StageFailed(f"stage {name}: {exc}") from exc
        if code:
            raise StageFailed(f"stage {name}: `nanoseek {' '.join(argv)}` exited with {code}")

    def stage(self, name: str, run, evaluated: bool = True) -> dict:
        """Run a stage (its output in OUT/name) unless a previous run finished it; evaluate its checkpoint."""
        record = self.out / f"{name}.json"
        if record.exists():
            result = json.loads(record.read_text())
            print(f"[speedrun] {name}: done before, skipped", flush=True)
        else:
            print(f"[speedrun] {name} ...", flush=True)
            started = time.perf_counter()
            run()
            wall = time.perf_counter() - started
            tokens = self.tokens_trained(name)
            result = {"wall_s": wall, "tokens_per_s": tokens / wall if tokens else None}
            if evaluated:
                result.update(self.evaluate(self.out / name / "latest"))
            record.write_text(json.dumps(result, indent=2) + "\n")
        self.results[name] = result
        return result

    def evaluate(self, checkpoint: Path) -> dict:
        plan = self.plan
        llm = LLM(checkpoint, device=self.device, max_num_seqs=min(256, plan.eval_problems * plan.eval_samples),
                  max_model_len=plan.max_tokens + 256)
        problems = [(make_problem(TASK, i, 1, "eval"), 1) for i in range(plan.eval_problems)]
        report = evaluate(llm, problems, plan.eval_samples, max_tokens=plan.max_tokens, seed=self.seed)["all"]
        return {"pass@1": report["pass@1"], f"cons@{plan.eval_samples}": report[f"cons@{plan.eval_samples}"]}

    # ---- the pipeline --------------------------------------------------------------------------
    def run(self) -> Path:
        plan, seed = self.plan, str(self.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        d = self.out.joinpath
        base, sft, grpo = d("base", "latest"), d("sft", "latest"), d("grpo", "latest")
        student, traces = d("student-base", "latest"), d("rejection.jsonl")
        corpus = ["--corpus-tasks", TASK, "--corpus-max-difficulty", "2", "--corpus-docs", str(plan.corpus_docs),
                  "--seed", seed, "--seq-len", str(plan.seq_len)]
        chat = ["--batch-size", "16", "--seq-len", "96", "--seed", seed]
        self.stage("base", lambda: self.command("pretrain", [
            "pretrain", "--preset", plan.preset, "--out", str(d("base")), "--max-steps", str(plan.pretrain_steps),
            "--save-every", str(plan.pretrain_steps), *corpus,
            *(["--vocab-size", str(plan.vocab_size)] if plan.vocab_size else [])]))
        self.stage("sft", lambda: self.command("sft", [
            "sft", "--model", str(base), "--out", str(d("sft")), "--tasks", TASK, "--max-difficulty", "2",
            "--max-steps", str(plan.sft_steps), "--lr", str(plan.sft_lr), "--save-every", str(plan.sft_steps),
            *chat]))
        self.stage("grpo", lambda: self.grpo(sft, d("grpo"), plan.grpo_steps))
        for index in range(1, plan.grpo_seeds):  # the seed-to-seed spread the gain must exceed
            self.stage(f"grpo-seed{index}", lambda i=index: self.grpo(sft, d(f"grpo-seed{i}"), plan.grpo_steps,
                                                                      self.seed + i))

        def rejection_sft() -> None:
            self.command("rejection-sample", [
                "rejection-sample", "--model", str(grpo), "--out", str(traces), "--tasks", TASK, "--difficulties",
                "1,2", "--prompts", str(plan.rejection_prompts), "--samples", "4", "--max-tokens",
                str(plan.max_tokens), "--seed", seed])
            self.command("sft", ["sft", "--model", str(base), "--data", str(traces), "--out", str(d("rejection-sft")),
                                 "--max-steps", str(plan.rejection_sft_steps), "--save-every",
                                 str(plan.rejection_sft_steps), *chat])

        self.stage("rejection-sft", rejection_sft)
        self.stage("student-base", lambda: self.command("student pretrain", [
            "pretrain", "--config", str(self.student_config()), "--tokenizer", str(base), "--out",
            str(d("student-base")), "--max-steps", str(plan.student_base_steps), "--save-every",
            str(plan.student_base_steps), *corpus]), evaluated=False)
        distill = self.stage("student-distill", lambda: self.command("distill", [
            "distill", "--student", str(student), "--data", str(traces), "--out", str(d("student-distill")),
            "--max-steps", str(plan.distill_steps), "--save-every", str(plan.distill_steps), *chat]))
        self.stage("student-grpo", lambda: self.grpo(student, d("student-grpo"),
                                                     self.equal_compute_steps(distill["wall_s"])))
        return self.write_report()

    def grpo(self, model: Path, out: Path, steps: int, seed: int | None = None) -> None:
        plan = self.plan
        self.command("grpo", [
            "grpo", "--model", str(model), "--out", str(out), "--tasks", TASK, "--max-steps", str(steps),
            "--batch-size", "8", "--grad-accum", str(max(1, plan.grpo_prompts // 8)), "--group-size",
            str(plan.group_size), "--temperature", "0.7", "--lr", str(plan.grpo_lr), "--warmup-steps", "0",
            "--max-new-tokens", str(plan.max_tokens), "--bias-gamma", "0", "--save-every", str(steps),
            "--eval-every", str(max(1, steps // 4)), "--seq-len", str(plan.seq_len),
            "--seed", str(self.seed if seed is None else seed)])

    def equal_compute_steps(self, distill_seconds: float) -> int:
        """GRPO steps that take about as long as the distillation did, from the teacher's GRPO pace."""
        grpo = self.results["grpo"]["wall_s"] / self.plan.grpo_steps
        return max(1, round(distill_seconds / grpo))

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

    # ---- the report ----------------------------------------------------------------------------
    def write_report(self) -> Path:
        plan, out = self.plan, self.out
        k = plan.eval_samples
        rows = [f"| stage | pass@1 (%) | cons@{k} (%) | tokens/s | wall time |", "|---|---|---|---|---|"]
        for name in ("base", "sft", "grpo", "rejection-sft", "student-distill", "student-grpo"):
            r = self.results.get(name, {})
            speed = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
            rows.append(f"| {name} | {r.get('pass@1', float('nan')):.1f} | {r.get(f'cons@{k}', float('nan')):.1f} "
                        f"| {speed} | {r.get('wall_s', 0) / 60:.1f} min |")
        plots = self.plots()
        total = sum(r.get("wall_s", 0) for r in self.results.values())
        runs = [self.results[n]["pass@1"] for n in ["grpo", *(f"grpo-seed{i}" for i in range(1, plan.grpo_seeds))]
                if n in self.results]
        spread = max(runs) - min(runs) if runs else float("nan")
        gain = sum(runs) / len(runs) - self.results.get("sft", {}).get("pass@1", float("nan")) if runs else \
            float("nan")
        seeds_line = (f"GRPO from the same SFT checkpoint with {len(runs)} seeds: pass@1 "
                      f"{' / '.join(f'{r:.1f}' for r in runs)}; mean gain over SFT {gain:+.1f} points, "
                      f"spread across seeds {spread:.1f} points.")
        lines = ["# nanoseek speedrun", "",
                 f"Held-out {TASK} problems (difficulty 1, {plan.eval_problems} problems, {k} samples each at "
                 "temperature 0.6, top-p 0.95; pass@1 is the mean over samples). Student: a dense Qwen2-layout "
                 "model with the teacher's tokenizer; `student-grpo` ran GRPO for the wall time distillation took.",
                 "", *rows, "", seeds_line, "", f"Total wall time: {total / 60:.1f} min.", "",
                 *[f"![{title}]({path.name})" for title, path in plots], "", self.cost_line(), "",
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
            made.append(("grpo", plot_curves(rl, ["reward", "accuracy", "length_correct", "length_wrong", "entropy",
                                                  "zero_variance"], out / "grpo.png",
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


def run(args: argparse.Namespace) -> int:
    if not args.scale > 0:
        raise ValueError(f"--scale = {args.scale}: must be > 0")
    plan = (Plan.tiny() if args.tiny else Plan()).scaled(args.scale)
    torch.manual_seed(args.seed)
    speedrun = Speedrun(Path(args.out), plan, args.seed, args.device)
    try:
        report = speedrun.run()
    except StageFailed as exc:
        print(f"[speedrun] stopped: {exc}. Finished stages are kept in {args.out}; rerun to continue.", flush=True)
        return 1
    print((report.read_text().split("\n\n")[2]) if report.exists() else "", flush=True)
    print(f"[speedrun] report: {report}\nChat: nanoseek chat --model {args.out}/grpo/latest\n"
          f"Serve: nanoseek serve --model {args.out}/grpo/latest", flush=True)
    return 0
