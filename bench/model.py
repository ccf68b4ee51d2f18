"""Model-level throughput, nanoseek against transformers on the same weights, in one run.

Measures, for the DESIGN.md reference config (`small` preset, ~107M total / 26M active parameters):
* prefill: forward tokens/s without gradients (batch x seq tokens per call);
* training step: forward + backward of next-token cross-entropy, tokens/s, and MFU against this machine's
  measured fp32 GEMM peak.
Both models are the same checkpoint (nanoseek writes it, transformers loads it) in fp32 on CPU or bf16 on
CUDA. Run: `python bench/model.py [--preset small] [--batch 8] [--seq 256] [--steps 5]`.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoseek  # noqa: E402
from nanoseek.sizing import parameter_counts  # noqa: E402


def gemm_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, device: torch.device) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    from transformers import DeepseekV3ForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = nanoseek.preset(args.preset, num_nextn_predict_layers=0)
    with tempfile.TemporaryDirectory() as tmp:
        nanoseek.CausalLM(config).save_pretrained(tmp)
        ours = nanoseek.load_model(tmp, device=device, dtype=dtype)
        theirs = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=dtype).to(device)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    tokens = ids.numel()

    def forward(model, logits_of):
        def run():
            with torch.no_grad():
                logits_of(model, ids)
        return run

    def train_step(model, logits_of):
        def run():
            logits = logits_of(model, ids)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    def nanoseek_logits(model, x):
        return model(x)

    def hf_logits(model, x):
        return model(x, use_cache=False).logits

    peak = gemm_peak(device, dtype)
    train_flops = 6 * parameter_counts(config).activated * tokens  # 6N per token (forward 2N, backward 4N)
    rows = []
    for label, make in (("prefill forward", forward), ("training step", train_step)):
        theirs.train(label == "training step")
        ours.train(label == "training step")
        t_hf = timed(make(theirs, hf_logits), args.steps, device)
        t_ns = timed(make(ours, nanoseek_logits), args.steps, device)
        rows.append((label, tokens / t_hf, tokens / t_ns, t_hf / t_ns, train_flops / t_ns / peak))

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{device.type}, {dtype}, torch {torch.__version__}")
    print(f"config: preset {args.preset}, batch {args.batch} x {args.seq} tokens; measured GEMM peak "
          f"{peak / 1e9:.0f} GFLOP/s")
    print(f"{'':18}{'transformers tok/s':>20}{'nanoseek tok/s':>16}{'ratio':>8}{'nanoseek MFU':>14}")
    for label, hf_tps, ns_tps, ratio, mfu in rows:
        mfu_text = f"{100 * mfu:.0f}%" if label == "training step" else ""
        print(f"{label:18}{hf_tps:>20.0f}{ns_tps:>16.0f}{ratio:>7.2f}x{mfu_text:>14}")


if __name__ == "__main__":
    main()
