"""Decode and prefill against llama.cpp on the same weights: nanoseek's `LLM.generate` and llama.cpp's
`llama_decode` (through llama-cpp-python's bindings to the library it builds from source:
`pip install llama-cpp-python`, a benchmark-only dependency), in one run, on one machine.

Two configs with random weights (seed 0) and a byte-level BPE tokenizer trained on the built-in corpus: the
`small` DeepSeek-V3 reference config (MLA + MoE, no MTP) and a dense Llama-shaped config of 135M parameters
(30 layers, hidden 576, 9 heads, 3 KV heads, vocabulary 49,152, tied head: SmolLM-135M's shape). Each is
saved as a checkpoint, exported with `nanoseek export-gguf` as f32, q8_0 and q4_0, and run as fp32 / int8 /
int4 (`LLM(quantize=...)`; fp32 and int8 with `compile=True`, int4 eager) against llama.cpp's F32 / Q8_0 / Q4_0.
Work: greedy decode of 128 new tokens after a 64-token prompt at batch 1 and 16 (16 sequences in one batch,
each its own), and prefill of 64 and 1,024 tokens at batch 1; medians of --repeats, the two engines
alternating, after a warm-up of each shape. Decode tok/s counts only the decode steps.

The floor: a batch-1 step must read every activated weight once. Its bytes (activated parameters x bytes per
value of the format: 4, 1 + a scale per row, 0.5 + a scale and zero per 64 (llama.cpp's Q4_0: 18 bytes per 32))
over a bandwidth measured in the same run: the read bandwidth of a 512 MB sum or dot product (the faster), and
the best fp32 matrix-vector product over a 256 MB matrix (what a GEMV can stream here). Each batch-1 figure is
printed as a fraction of both.

Run: `python bench/llamacpp.py [--configs small llama-135m] [--formats fp32 int8 int4] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoseek  # noqa: E402
from nanoseek import LLM, SamplingParams  # noqa: E402
from nanoseek.config import DenseConfig  # noqa: E402
from nanoseek.gguf_export import export_gguf  # noqa: E402
from nanoseek.model import build_model  # noqa: E402
from nanoseek.sizing import parameter_counts  # noqa: E402
from nanoseek.tasks.corpus import generate_corpus  # noqa: E402
from nanoseek.tokenizer import train_tokenizer  # noqa: E402

CONFIGS = {
    "small": lambda: nanoseek.preset("small", num_nextn_predict_layers=0),
    "llama-135m": lambda: DenseConfig(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                      max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0,
                                      rms_norm_eps=1e-5),
}
FORMATS = {"fp32": ("f32", None, 4.0), "int8": ("q8_0", "int8", 1.0), "int4": ("q4_0", "int4", 0.5625)}
CPUINFO = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
AMX_HOST = "amx_int8" in CPUINFO
CPU_NAME = next((line.split(":", 1)[1].strip() for line in CPUINFO.splitlines() if line.startswith("model name")),
                platform.processor())
PROMPT, NEW, BATCH, LONG = 64, 128, 16, 1024


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bandwidths() -> tuple[float, float]:
    """(read GB/s: the faster of a sum and a dot product over 512 MB, best fp32 GEMV GB/s over a 256 MB
    matrix), best of five each."""
    values = torch.ones(128 * 2**20)
    matrix, vector = torch.randn(16384, 4096), torch.randn(1, 16384)
    read = min(seconds(fn) for fn in (values.sum, lambda: torch.dot(values, values)) for _ in range(5))
    gemv = min(seconds(lambda: vector @ matrix) for _ in range(5))
    return values.numel() * 4 / read / 1e9, matrix.numel() * 4 / gemv / 1e9


def write_checkpoint(name: str, root: Path) -> Path:
    torch.manual_seed(0)
    config = CONFIGS[name]()
    model = build_model(config)
    path = root / name
    model.save_pretrained(path)
    tokenizer = train_tokenizer(generate_corpus(2000, seed=0), 4096)
    tokenizer.save(path)
    for gguf_type, _, _ in FORMATS.values():
        export_gguf(model, tokenizer, root / f"{name}-{gguf_type}.gguf", gguf_type)
    return path


def _quiet(level: int, text: bytes, data: ctypes.c_void_p) -> None:
    """llama.cpp's log callback: its load and graph reports would drown the table."""


try:
    from llama_cpp import llama_log_callback

    _QUIET = llama_log_callback(_quiet)  # kept referenced: llama.cpp calls it for the whole run
except ImportError:  # the table needs llama-cpp-python: `pip install llama-cpp-python`
    _QUIET = None


class LlamaCpp:
    """One llama.cpp context over a GGUF file: greedy decode of up to BATCH sequences, each its own."""

    def __init__(self, path: Path, threads: int):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_log_set(_QUIET, ctypes.c_void_p())
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        # On CPUs with AMX, llama.cpp 0.3.36's extra weight buffers (AMX, repacked) crash on both configs' Q8_0
        # files (an assert in ggml-backend's scheduler, or a segfault): there the weights stay in plain CPU buffers,
        # for its usual kernels.
        params.use_extra_bufts = not AMX_HOST
        self.model = lc.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        context = lc.llama_context_default_params()
        context.n_ctx, context.n_batch, context.n_ubatch = BATCH * (PROMPT + NEW + 8) + LONG, LONG, 512
        context.n_seq_max, context.n_threads, context.n_threads_batch = BATCH, threads, threads
        context.kv_unified = True  # one cache the sequences share, not n_ctx / n_seq_max each
        self.ctx = lc.llama_init_from_model(self.model, context)
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(max(LONG, BATCH * PROMPT), 0, BATCH)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows of (token, position, sequence, wants logits)."""
        batch = self.batch
        batch.n_tokens = len(rows)
        for i, (token, position, sequence, logits) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0], batch.logits[i] = sequence, logits
        if self.lc.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)

    def _argmax(self, index: int) -> int:
        logits = self.lc.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)), (self.vocab,)).argmax())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuations of each prompt (one sequence each), prompts prefilled in one batch."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        rows = [(t, p, s, p == len(prompt) - 1) for s, prompt in enumerate(prompts) for p, t in enumerate(prompt)]
        self._decode(rows)
        ends = [i for i, row in enumerate(rows) if row[3]]  # logits are asked by the token's index in the batch
        outputs = [[self._argmax(i)] for i in ends]
        for step in range(1, new_tokens):
            self._decode([(out[-1], len(prompt) + step - 1, s, True)
                          for s, (prompt, out) in enumerate(zip(prompts, outputs, strict=True))])
            for s, out in enumerate(outputs):
                out.append(self._argmax(s))
        return outputs


def nanoseek_runner(path: Path, quantize: str | None) -> Callable[[list[list[int]], int], list[list[int]]]:
    # float and int8 weights decode compiled (the faster path); int4 runs eager on its kernel
    llm = LLM(path, quantize=quantize, max_num_seqs=BATCH, max_model_len=LONG + 8, compile=quantize != "int4")

    def run(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]
    return run


def measure(runners: dict[str, Callable], prompts: list[list[int]], long: list[int], repeats: int) -> dict:
    """engine -> {decode b1, decode b16 (tok/s), prefill 64, prefill 1024 (tok/s)}: medians, engines alternating."""
    work = {"decode b1": (prompts[:1], NEW), "decode b1 one": (prompts[:1], 1),
            "decode b16": (prompts, NEW), "decode b16 one": (prompts, 1), "prefill 1024": ([long], 1)}
    for run in runners.values():  # warm-up, each shape once (nanoseek compiles its decode steps here)
        run(prompts[:1], 3)
        run(prompts, 3)
    times: dict[str, dict[str, list[float]]] = {name: {key: [] for key in work} for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            for key, (batch, new) in work.items():
                times[name][key].append(seconds(lambda r=run, b=batch, n=new: r(b, n)))
    results = {}
    for name, t in times.items():
        median = {key: statistics.median(values) for key, values in t.items()}
        results[name] = {
            "decode b1": (NEW - 1) / (median["decode b1"] - median["decode b1 one"]),
            "decode b16": BATCH * (NEW - 1) / (median["decode b16"] - median["decode b16 one"]),
            "prefill 64": PROMPT / median["decode b1 one"], "prefill 1024": LONG / median["prefill 1024"]}
    return results


def report(name: str, form: str, results: dict, floor_bytes: float, read: float, gemv: float) -> None:
    ours, theirs = results["nanoseek"], results["llama.cpp"]
    cells = [f"{ours[key]:.1f} / {theirs[key]:.1f} ({ours[key] / theirs[key]:.2f}x)" for key in ours]
    floors = [f"{100 * engine['decode b1'] * floor_bytes / (bw * 1e9):.0f}%" for bw in (read, gemv)
              for engine in (ours, theirs)]
    print(f"| {name} | {form} | " + " | ".join(cells) + f" | {' / '.join(floors[:2])} | {' / '.join(floors[2:])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    read, gemv = bandwidths()
    print(f"machine: {platform.machine()} {CPU_NAME}{' (AMX: llama.cpp without extra buffers)' * AMX_HOST}, "
          f"{threads} threads, torch {torch.__version__}; "
          f"read {read:.1f} GB/s (512 MB sum or dot), fp32 GEMV {gemv:.1f} GB/s (256 MB matrix)")
    print("| config | weights | decode b1 tok/s, nanoseek / llama.cpp | decode b16 | prefill 64 | prefill 1024 | "
          "b1 of the read floor, nanoseek / llama.cpp | b1 of the GEMV floor |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            path = write_checkpoint(name, Path(tmp))
            prompts = rng.integers(300, 4000, (BATCH, PROMPT)).tolist()
            long = rng.integers(300, 4000, LONG).tolist()
            activated = parameter_counts(CONFIGS[name]()).activated
            for form in args.formats:
                gguf_type, quantize, value_bytes = FORMATS[form]
                cpp = LlamaCpp(Path(tmp) / f"{name}-{gguf_type}.gguf", threads)
                runners = {"nanoseek": nanoseek_runner(path, quantize), "llama.cpp": cpp.generate}
                results = measure(runners, prompts, long, args.repeats)
                report(name, form, results, activated * value_bytes, read, gemv)
                cpp.close()


if __name__ == "__main__":
    main()
