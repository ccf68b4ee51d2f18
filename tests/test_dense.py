"""The dense student family (Llama, Qwen2) against transformers: logits, checkpoints both ways, the engine."""

from __future__ import annotations

import pytest
import torch

import nanoseek
from nanoseek import LLM, SamplingParams
from nanoseek.model.dense import DenseLM
from nanoseek.sizing import parameter_counts

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1)
CASES = {
    # R1-Distill-Qwen's layout: q/k/v biases, GQA, large rope_theta, tied embeddings in the small ones
    "qwen2-tied": ("qwen2", dict(rope_theta=1e6, tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict(rope_theta=10000.0, tie_word_embeddings=False)),
    # R1-Distill-Llama's layout: no biases, Llama 3 rope scaling
    "llama3": ("llama", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama-head-dim": ("llama", dict(head_dim=32, attention_bias=True, num_key_value_heads=1)),
}


def hf_dense(family: str, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                                 "llama": (LlamaConfig, LlamaForCausalLM)}[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**BASE, **overrides}, attn_implementation="eager")).eval()
    with torch.no_grad():  # biases and norms away from their 0 / 1 defaults, which hide bugs
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.2 * torch.randn(param.shape))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_both_ways(case, tmp_path):
    from transformers import AutoModelForCausalLM

    family, overrides = CASES[case]
    reference = hf_dense(family, **overrides)
    reference.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    ours = nanoseek.load_model(tmp_path / "hf")
    assert isinstance(ours, DenseLM)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=1e-4)
    ours.save_pretrained(tmp_path / "ours")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back) is type(reference)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert parameter_counts(ours.config).total == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("case", ["qwen2-tied", "llama3"])
def test_engine_greedy_matches_transformers_generate(case, tmp_path):
    """`LLM(r1_distill_dir)` works: the engine's cached decode gives transformers' greedy tokens."""
    family, overrides = CASES[case]
    reference = hf_dense(family, seed=2, **overrides)
    reference.save_pretrained(tmp_path)
    prompts = [[5, 9, 17, 33, 2], [7] * 11 + [40, 41]]
    llm = LLM(tmp_path, device="cpu", max_num_seqs=4)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for prompt, output in zip(prompts, outputs, strict=True):
        generated = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                       pad_token_id=0)
        assert output.outputs[0].token_ids == generated[0, len(prompt):].tolist()


def test_dense_config_errors_name_the_field(tmp_path):
    family, overrides = CASES["qwen2"]
    hf_dense(family, **overrides).save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"num_key_value_heads": 2', '"num_key_value_heads": 3')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(nanoseek.CheckpointError, match="num_key_value_heads"):
        nanoseek.load_model(tmp_path)


def test_the_training_loop_trains_a_dense_student(tmp_path):
    """The one training loop runs the dense family too (SFT on R1-format traces here): the loss falls."""
    from nanoseek.data import ChatSequences
    from nanoseek.model.dense import DenseConfig
    from nanoseek.tasks.corpus import generate_corpus
    from nanoseek.tokenizer import train_tokenizer
    from nanoseek.train import TrainConfig, Trainer
    from nanoseek.train.sft import cold_start

    tokenizer = train_tokenizer(generate_corpus(300, seed=1), 320)
    torch.manual_seed(0)
    student = DenseLM(DenseConfig(model_type="qwen2", vocab_size=tokenizer.vocab_size, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True))
    data = ChatSequences(cold_start(["arithmetic"], 200, 1, 0), tokenizer, 64, 0)
    config = TrainConfig(max_steps=30, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=3, eval_every=1000,
                         mtp_lambda=0.0, bias_gamma=0.0)
    trainer = Trainer(student, tokenizer, data, config, tmp_path / "student")
    losses = [trainer.train_step()["loss"] for _ in range(30)]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_distillation_lowers_the_students_loss_on_teacher_traces(tmp_path):
    """SFT on the teacher's traces plus the forward KL to its logits: both fall for the dense student."""
    import json
    import subprocess
    import sys

    from nanoseek.data import ChatSequences
    from nanoseek.model.dense import DenseConfig
    from nanoseek.tasks.corpus import generate_corpus
    from nanoseek.tokenizer import train_tokenizer
    from nanoseek.train import TrainConfig, Trainer
    from nanoseek.train.distill import DistillConfig, DistillTrainer
    from nanoseek.train.sft import cold_start

    tokenizer = train_tokenizer(generate_corpus(300, seed=1), 320)
    torch.manual_seed(0)
    teacher = nanoseek.CausalLM(nanoseek.preset("tiny", vocab_size=tokenizer.vocab_size, num_nextn_predict_layers=0))
    traces = cold_start(["arithmetic"], 200, 1, 0)
    data = ChatSequences(traces, tokenizer, 64, 0)
    config = TrainConfig(max_steps=25, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=3, eval_every=1000,
                         mtp_lambda=0.0, bias_gamma=0.0)
    teaching = Trainer(teacher, tokenizer, data, config, tmp_path / "teaching")  # a teacher that knows the traces
    for _ in range(25):
        teaching.train_step()
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save(tmp_path / "teacher")
    (tmp_path / "traces.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in traces))
    student = DenseLM(DenseConfig(model_type="qwen2", vocab_size=tokenizer.vocab_size, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True))
    trainer = DistillTrainer(student, tokenizer, data, config, tmp_path / "student", teacher,
                             DistillConfig(kd_weight=0.5))
    first = trainer.train_step()
    for _ in range(23):
        trainer.train_step()
    last = trainer.train_step()
    assert last["ce"] < 0.6 * first["ce"] and last["kd"] < 0.6 * first["kd"]
    with pytest.raises(ValueError, match="one tokenizer"):
        wide = DenseLM(DenseConfig(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        DistillTrainer(wide, tokenizer, data, config, tmp_path / "wide", teacher, DistillConfig(kd_weight=0.5))
    result = subprocess.run([sys.executable, "-m", "nanoseek", "distill", "--student", "nano-dense", "--teacher",
                             str(tmp_path / "teacher"), "--data", str(tmp_path / "traces.jsonl"), "--out",
                             str(tmp_path / "cli"), "--max-steps", "2", "--batch-size", "2", "--seq-len", "64",
                             "--kd-weight", "0.5", "--save-every", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert isinstance(nanoseek.load_model(tmp_path / "cli" / "latest"), DenseLM)
