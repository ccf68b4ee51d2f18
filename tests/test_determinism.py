"""Reproducible training on two CPU threads: one batch's gradients repeat bit for bit, and the same run twice, or a
run killed and resumed, ends with bit-identical weights.

The shapes matter: ATen splits an op across threads only from 32,768 elements on, so the batch is 4 x 64 tokens,
whose 768 (token, expert) rows of width 64 in each MoE layer pass that; test_train's 4 x 32 stays below it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nanoseek
from nanoseek.train.loop import OPTIMIZER_FILE
from nanoseek.train.losses import mtp_loss, token_loss_sum

RUN = ["--preset", "tiny", "--vocab-size", "320", "--corpus-docs", "600", "--seq-len", "64", "--batch-size", "4",
       "--warmup-steps", "2", "--eval-every", "20", "--eval-batches", "1", "--max-steps", "12", "--save-every", "2"]
TWO_THREADS = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def _pretrain(out: Path, *extra: str) -> None:
    result = subprocess.run([sys.executable, "-m", "nanoseek", "pretrain", *RUN, "--out", str(out), *extra],
                            env=TWO_THREADS, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def _assert_same_training_state(expected: Path, got: Path) -> None:
    """Weights and optimizer moments of both runs' last checkpoints, tensor by tensor, bit for bit."""
    for name in ("model.safetensors", OPTIMIZER_FILE):
        want, have = load_file(expected / "latest" / name), load_file(got / "latest" / name)
        assert want.keys() == have.keys()
        differing = [key for key in want if not torch.equal(want[key], have[key])]
        assert not differing, f"{name}: {len(differing)} of {len(want)} tensors differ, e.g. {differing[:3]}"


def _gradients(model: nanoseek.CausalLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of the pretraining loss (next token + MTP) on one batch."""
    model.zero_grad(set_to_none=True)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    out = model(inputs, mtp=True, router_stats=True)
    count = targets.numel()
    (token_loss_sum(out.logits, targets) / count + mtp_loss(out, targets, torch.tensor(count))).backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def test_one_batch_gives_the_same_gradients_every_time_on_two_threads():
    """A thread race in some backward kernel shows within a few repeats, long before it reaches the weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = nanoseek.CausalLM(nanoseek.preset("tiny").replace(vocab_size=320))
        ids = torch.randint(0, 320, (4, 65), generator=torch.Generator().manual_seed(1))
        first = _gradients(model, ids)
        for _ in range(5):
            again = _gradients(model, ids)
            assert [name for name in first if not torch.equal(first[name], again[name])] == []
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """One uninterrupted 12-step run at two threads."""
    out = tmp_path_factory.mktemp("determinism") / "whole"
    _pretrain(out)
    return out


def test_two_runs_on_two_threads_end_bit_identical(whole, tmp_path):
    again = tmp_path / "again"
    _pretrain(again)
    _assert_same_training_state(whole, again)


def test_sigkill_then_resume_on_two_threads_is_bit_identical(whole, tmp_path):
    broken = tmp_path / "broken"
    process = subprocess.Popen([sys.executable, "-m", "nanoseek", "pretrain", *RUN, "--out", str(broken)],
                               env=TWO_THREADS, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        latest = broken / "latest"
        if latest.exists() and os.readlink(latest) >= "checkpoints/step-00000004":
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert os.readlink(broken / "latest") < "checkpoints/step-00000012"  # killed mid-run
    assert nanoseek.load_model(broken / "latest") is not None  # latest is always complete
    _pretrain(broken, "--resume")
    _assert_same_training_state(whole, broken)
    steps = [json.loads(line)["step"] for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # the killed run's steps after its checkpoint are not logged twice
