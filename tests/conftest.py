"""Shared helpers: random tiny checkpoints written by transformers (the oracle) and by nanoseek."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.config import PRESETS

if "PYTEST_XDIST_WORKER" in os.environ:
    # `make test` runs one pytest worker per core: each, and every process it starts, keeps to one thread, since
    # two workers of two threads each on two cores would wait on each other's spinning OpenMP threads.
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    torch.set_num_threads(1)


def tiny_config(**overrides) -> dict:
    """The tiny config (every dimension distinct) as transformers kwargs (no MTP unless asked)."""
    config = {**PRESETS["tiny"], "num_nextn_predict_layers": 0}
    config.update(overrides)
    return config


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0, bias_shift: float = 0.0) -> torch.nn.Module:
    """Non-trivial norm weights and random correction biases: defaults of 1 and 0 hide bugs."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(bias_shift + torch.randn(buffer.shape, generator=generator))
    return model


def hf_model(seed: int = 0, bias_shift: float = 0.0, **overrides):
    """A random transformers DeepseekV3ForCausalLM (fp32, eager) with perturbed norms and biases."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV3Config(**tiny_config(**overrides), attn_implementation="eager")
    return perturb(DeepseekV3ForCausalLM(config).eval(), seed, bias_shift)


def nanoseek_model(seed: int = 0, **overrides) -> nanoseek.CausalLM:
    torch.manual_seed(seed)
    config = nanoseek.ModelConfig(**tiny_config(**overrides))
    return perturb(nanoseek.CausalLM(config).eval(), seed)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A nanoseek-written tiny checkpoint with one MTP module."""
    path = tmp_path / "tiny"
    nanoseek_model(num_nextn_predict_layers=1).save_pretrained(path)
    return path


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)
SPECIALS = ["<bos>", "<eos>", "<unk>", "<think>", "</think>", "<|user|>", "<|assistant|>"]


def make_tokenizer(vocab_size: int = 128):
    """A small BPE tokenizer (BOS 0, EOS 1, as the tiny config says) with an R1-style chat template."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from nanoseek.tokenizer import Tokenizer as NanoTokenizer

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    alphabet = list(string.ascii_letters + string.digits + " .,!?+-*/=()")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                  show_progress=False)
    corpus = ["the answer is 42. what is 2 + 3? it is 5.", "hello there, the cat sat on the mat!"] * 20
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}
    tokenizer = NanoTokenizer(backend, config)
    assert tokenizer.vocab_size <= vocab_size and tokenizer.eos_token_id == 1
    return tokenizer


@pytest.fixture
def chat_checkpoint(tmp_path: Path) -> Path:
    """A tiny checkpoint with MTP weights, a tokenizer and a chat template."""
    path = tmp_path / "chat"
    nanoseek_model(num_nextn_predict_layers=1).save_pretrained(path)
    make_tokenizer().save(path)
    return path
