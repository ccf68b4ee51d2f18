"""Training throughput, nanoseek against transformers on the same weights and batch, in one run.

For the DESIGN.md reference config (`small` preset, ~107M total / 26M active parameters, no MTP module so both
do the same work) it measures:
* training step: forward, backward of next-token cross-entropy and an AdamW step, tokens/s, and MFU (6N
  FLOPs per token, N = activated parameters) against the GEMM peak measured in the same run. nanoseek runs its
  real training loop (`Trainer.train_step`, which also updates the router biases); transformers runs
  `DeepseekV3ForCausalLM` with `torch.optim.AdamW`;
* forward only: tokens/s without gradients.
fp32 on CPU, bf16 (autocast for nanoseek) on CUDA. Run: `python bench/train.py [--preset small] [--batch 8]
[--seq 256] [--steps 5]`.
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
from nanoseek.data import Batch  # noqa: E402
from nanoseek.data.shards import ShuffledBatches  # noqa: E402
from nanoseek.sizing import parameter_counts  # noqa: E402
from nanoseek.train import TrainConfig, Trainer  # noqa: E402


class FixedBatch(ShuffledBatches):
    """The same batch every step, so both trainers see identical work."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        super().__init__(rows=2, seq_len=ids.shape[1] - 1, seed=0, val_fraction=0.5)

    def _take(self, rows: list[int]) -> Batch:
        return Batch(self.ids[:, :-1], self.ids[:, 1:])


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


def paired(first, second, steps: int, device: torch.device) -> tuple[float, float]:
    """Median seconds per call of each, after a warm-up, alternating the two calls so that the load of a
    shared machine falls on both alike."""
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(steps):
        for fn, bucket in ((first, times[0]), (second, times[1])):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    from transformers import DeepseekV3ForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = nanoseek.preset(args.preset, num_nextn_predict_layers=0)
    tmp = tempfile.TemporaryDirectory()
    nanoseek.CausalLM(config).save_pretrained(tmp.name)
    # nanoseek trains fp32 master weights (bf16 autocast on CUDA); transformers is loaded in the same dtype
    ours = nanoseek.load_model(tmp.name, device=device, dtype=torch.float32)
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp.name, dtype=torch.float32).to(device)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), device=device)
    tokens = args.batch * args.seq
    trainer = Trainer(ours, None, FixedBatch(ids), TrainConfig(batch_size=args.batch, seq_len=args.seq,
                                                               mtp_lambda=0.0, warmup_steps=1), Path(tmp.name))
    optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)

    def hf_train_step():
        theirs.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = theirs(ids[:, :-1], use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward(run):
        def timed_forward():
            with torch.no_grad():
                run()
        return timed_forward

    peak = gemm_peak(device, dtype)
    train_flops = 6 * parameter_counts(config).activated * tokens
    rows = []
    t_hf, t_ns = paired(hf_train_step, trainer.train_step, args.steps, device)
    rows.append(("training step", tokens / t_hf, tokens / t_ns, t_hf / t_ns, train_flops / t_hf / peak,
                 train_flops / t_ns / peak))
    theirs.eval()
    ours.eval()
    t_hf, t_ns = paired(forward(lambda: theirs(ids[:, :-1], use_cache=False)), forward(lambda: ours(ids[:, :-1])),
                        args.steps, device)
    rows.append(("forward only", tokens / t_hf, tokens / t_ns, t_hf / t_ns, None, None))

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{device.type}, {dtype}, torch {torch.__version__}")
    print(f"config: preset {args.preset}, batch {args.batch} x {args.seq} tokens; measured GEMM peak "
          f"{peak / 1e9:.0f} GFLOP/s")
    print(f"{'':15}{'transformers tok/s':>20}{'nanoseek tok/s':>16}{'ratio':>8}{'MFU transformers':>18}"
          f"{'MFU nanoseek':>14}")
    for label, hf_tps, ns_tps, ratio, hf_mfu, ns_mfu in rows:
        mfus = f"{100 * hf_mfu:>17.0f}%{100 * ns_mfu:>13.0f}%" if hf_mfu is not None else ""
        print(f"{label:15}{hf_tps:>20.0f}{ns_tps:>16.0f}{ratio:>7.2f}x{mfus}")


if __name__ == "__main__":
    main()
