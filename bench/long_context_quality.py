"""Long context at toy scale: YaRN extension of a pretrained `nano` model, then DeepSeek Sparse Attention on top,
against the dense model trained the same way (DeepSeek-V3.2-Exp report §2.1: V3.2 is V3.1-Terminus continued
through a dense warm-up of the indexer and sparse training; its §3 compares it with the dense model).

Stages, each a `nanoseek` command whose output directory is kept (a finished stage is not run again):

1. base: `nano` pretrained at --base-seq-len tokens on the built-in task corpus;
2. retrieval: trained on short passkey documents at the same length, where it learns to look the key up (600
   steps of the task corpus leave `nano` no copying at all: it cannot even copy a number when sorting);
3. long: YaRN to --context positions (s = context / base length, V3 paper §4.3), trained on the built-in
   passkey corpus (long documents, a key planted far back and asked for at the end) at --seq-len;
4. dense: the long model trained --steps more on fresh passkey documents: the control;
5. sparse: the long model made DeepSeek-V3.2 (a lightning indexer of V3.2's proportions, top --index-topk)
   through --warmup-steps of indexer-only warm-up, then the same --steps as the control on the same data.

Then `nanoseek eval-long` scores long, dense and sparse on the same held-out documents at each --eval-contexts
length (loss per token, retrieval accuracy), and the sparse/dense ratios are printed beside them with the
training curves (`nanoseek plot`). One seed: every figure is the one run, not the best of several.
Run: `python bench/long_context_quality.py --out runs/long-context`.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def nanoseek(*args: str) -> None:
    print("$ nanoseek " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "nanoseek", *args], check=True, cwd=ROOT)


def stage(out: Path, *args: str) -> Path:
    """Run a pretrain stage into `out` unless it has finished; its last checkpoint."""
    if not (out / "latest" / "config.json").exists():
        start = time.perf_counter()
        nanoseek("pretrain", *args, "--out", str(out))
        print(f"{out.name}: {time.perf_counter() - start:.0f} s", flush=True)
    return out / "latest"


def train(args: argparse.Namespace) -> dict[str, Path]:
    out = args.out
    if args.start:
        base = Path(args.start)
    else:
        pretrained = stage(out / "base", "--preset", "nano", "--seq-len", str(args.base_seq_len), "--batch-size",
                           "16", "--max-steps", str(args.base_steps))
        base = stage(out / "retrieval", "--init", str(pretrained), "--corpus", "passkey", "--corpus-doc-chars",
                     "100,500", "--corpus-docs", "12000", "--seq-len", str(args.base_seq_len), "--batch-size", "16",
                     "--lr", "2e-3", "--warmup-steps", "10", "--max-steps", str(args.retrieval_steps))
    passkey = ["--corpus", "passkey", "--corpus-doc-chars", args.doc_chars, "--seq-len", str(args.seq_len),
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", "10",
               "--eval-every", str(args.eval_every), "--eval-batches", "4"]
    long = stage(out / "long", "--init", str(base), *passkey, "--extend-context", str(args.context),
                 "--trained-context", str(args.base_seq_len), "--corpus-docs", str(args.docs),
                 "--max-steps", str(args.long_steps))
    fresh = ["--init", str(long), *passkey, "--corpus-docs", str(args.docs), "--seed", "1"]
    dense = stage(out / "dense", *fresh, "--max-steps", str(args.steps))
    sparse = stage(out / "sparse", *fresh, "--index-topk", str(args.index_topk), "--dsa-warmup-steps",
                   str(args.warmup_steps), "--dsa-steps", str(args.steps))
    return {"long": long, "dense": dense, "sparse": sparse}


def evaluate(args: argparse.Namespace, models: dict[str, Path]) -> dict[str, dict]:
    reports = {}
    for name, model in models.items():
        path = args.out / f"eval-{name}.json"
        if not path.exists():
            nanoseek("eval-long", "--model", str(model), "--contexts", args.eval_contexts, "--documents",
                     str(args.eval_documents), "--json", str(path))
        reports[name] = json.loads(path.read_text())["contexts"]
    return reports


def summary(reports: dict[str, dict]) -> str:
    lines = ["| context | model | loss | retrieval % | key tokens % | retrieval by key depth q1-q4 % |",
             "|---|---|---|---|---|---|"]
    for context in reports["dense"]:
        for name, report in reports.items():
            row = report[context]
            depths = " / ".join("-" if v is None else f"{v:.0f}" for v in row["by_depth"].values())
            lines.append(f"| {context} | {name} | {row['loss']:.4f} | {row['accuracy']:.1f} | "
                         f"{row['key_tokens']:.1f} | {depths} |")
        dense, sparse = reports["dense"][context], reports["sparse"][context]
        lines.append(f"| {context} | sparse vs dense | {sparse['loss'] / dense['loss']:.4f}x | "
                     f"{sparse['accuracy'] - dense['accuracy']:+.1f} points | "
                     f"{sparse['key_tokens'] - dense['key_tokens']:+.1f} points | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/long-context"))
    parser.add_argument("--start", help="a checkpoint that retrieves at --base-seq-len to extend (default: stages "
                        "1 and 2 make one)")
    parser.add_argument("--base-seq-len", type=int, default=256)
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--retrieval-steps", type=int, default=750)
    parser.add_argument("--context", type=int, default=8192, help="positions after the YaRN extension")
    parser.add_argument("--seq-len", type=int, default=2048, help="training sequence length of the long stages")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--doc-chars", default="300,5000", help="passkey documents' length in characters")
    parser.add_argument("--docs", type=int, default=1500, help="passkey documents per long stage")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--long-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=100, help="dense and sparse training steps after the long stage")
    parser.add_argument("--index-topk", type=int, default=256)
    parser.add_argument("--warmup-steps", type=int, default=30, help="the indexer's dense warm-up")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-contexts", default="2048,4096,8192")
    parser.add_argument("--eval-documents", type=int, default=40)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()}", flush=True)
    models = train(args)
    reports = evaluate(args, models)
    runs = [f"{name}={args.out / name / 'metrics.jsonl'}" for name in ("dense", "sparse")]
    nanoseek("plot", *runs, "--keys", "loss,val_loss,index_recall", "--out", str(args.out / "curves.png"))
    print(summary(reports))


if __name__ == "__main__":
    main()
