"""Training: tokenizer, data pipeline, the loop's losses and balancing, checkpoints and exact resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nanoseek
from nanoseek.config import DenseConfig
from nanoseek.data import DataError, PackedSequences, TokenStream, build_shards, read_documents
from nanoseek.data import resolve as resolve_files
from nanoseek.model import DenseLM, build_model
from nanoseek.tasks.corpus import generate_corpus
from nanoseek.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train import TrainConfig, Trainer

SMALL_RUN = ["--preset", "tiny", "--vocab-size", "320", "--corpus-docs", "600", "--seq-len", "32", "--batch-size", "4",
             "--warmup-steps", "2", "--eval-every", "4", "--eval-batches", "2"]


def pretrain(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoseek", "pretrain", *args], capture_output=True, text=True,
                          check=check, **kwargs)


@pytest.fixture(scope="module")
def corpus_tokenizer() -> Tokenizer:
    return train_tokenizer(generate_corpus(300, seed=1), 300)


def test_tokenizer_and_chat_template_match_transformers(corpus_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    corpus_tokenizer.save(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    text = "What is 12 + 7?\n<think>\n12 + 7 = 19\n</think>\nThe answer is 19. héllo 漢字"
    assert theirs.encode(text) == ours.encode(text)
    assert ours.decode(ours.encode(text)) == text  # reasoning tags survive decoding
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]
    for generation_prompt in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == \
            theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def test_corpus_is_seeded():
    assert list(generate_corpus(5, seed=3)) == list(generate_corpus(5, seed=3))
    assert list(generate_corpus(5, seed=3)) != list(generate_corpus(5, seed=4))
    docs = list(generate_corpus(200))
    answers = [doc for doc in docs if doc.count("<answer>") == doc.count("</answer>") == 1]
    assert len(answers) == len(docs)  # every document ends in one answer
    assert any("\nAssistant:<think>\n" in doc for doc in docs)  # the assistant reasons, some of the time
    assert any("\nAssistant:<answer>" in doc for doc in docs)  # and answers directly the rest
    assert all("<think>" not in doc for doc in docs if "\nTeacher:" in doc)  # R1 tags: the assistant's alone


def test_shards_keep_document_boundaries_and_batches_are_deterministic(corpus_tokenizer, tmp_path):
    docs = list(generate_corpus(200, seed=2))
    manifest = build_shards(iter(docs), corpus_tokenizer, tmp_path, "test", shard_tokens=2000)
    assert len(manifest["shards"]) > 1 and manifest["documents"] == 200
    stream = TokenStream(tmp_path, manifest)
    tokens = stream.window(0, stream.size)
    assert (tokens == corpus_tokenizer.eos_token_id).sum() == 200
    assert (tokens == corpus_tokenizer.bos_token_id).sum() == 200
    first = corpus_tokenizer.encode(docs[0]) + [corpus_tokenizer.eos_token_id]
    assert tokens[: len(first)].tolist() == first
    a, b = PackedSequences(stream, 32, seed=5), PackedSequences(stream, 32, seed=5)
    batches = [a.next_batch(4) for _ in range(3)]
    state = b.state()
    assert torch.equal(b.next_batch(4).inputs, batches[0].inputs)
    c = PackedSequences(stream, 32, seed=5)
    c.load_state({**state, "index": 4})
    assert torch.equal(c.next_batch(4).inputs, batches[1].inputs)
    assert torch.equal(batches[0].targets[:, :-1], batches[0].inputs[:, 1:])
    val = list(a.validation(4, 100))
    assert sum(len(v.inputs) for v in val) == a.val_windows
    assert a.train_windows + a.val_windows == (stream.size - 1) // 32


def test_sources_text_jsonl_parquet_and_their_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text('{"body": "first"}\n\n{"body": "second"}\n')
    pq.write_table(pa.table({"body": ["third", "fourth"]}), tmp_path / "c.parquet")
    files = resolve_files([str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet")])
    docs = list(read_documents(files, field="body"))
    assert docs == ["plain text document", "first", "second", "third", "fourth"]
    (tmp_path / "bad.jsonl").write_text('{"body": "ok"}\n{"text": "no body"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no field 'body'"):
        list(read_documents([tmp_path / "bad.jsonl"], field="body"))
    (tmp_path / "broken.jsonl").write_text('{"body": "ok"}\n{"body": \n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        list(read_documents([tmp_path / "broken.jsonl"], field="body"))
    with pytest.raises(DataError, match="no column 'text'"):
        list(read_documents([tmp_path / "c.parquet"], field="text"))
    with pytest.raises(DataError, match="missing.txt: no such file"):
        resolve_files([str(tmp_path / "missing.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files in"):
        resolve_files([str(tmp_path / "empty")])


def _trainer(tmp_path: Path, tokenizer: Tokenizer, **changes) -> Trainer:
    docs = generate_corpus(400, seed=0)
    manifest = build_shards(docs, tokenizer, tmp_path / "data", "test")
    config = TrainConfig(**{"max_steps": 30, "batch_size": 8, "seq_len": 32, "lr": 3e-3, "warmup_steps": 3,
                            "eval_every": 1000, "save_every": 1000, **changes})
    data = PackedSequences(TokenStream(tmp_path / "data", manifest), config.seq_len, config.seed)
    torch.manual_seed(0)
    model = nanoseek.CausalLM(nanoseek.preset("tiny", vocab_size=tokenizer.vocab_size,
                                              num_nextn_predict_layers=1))
    return Trainer(model, tokenizer, data, config, tmp_path / "run")


def test_bias_update_lowers_maxvio(corpus_tokenizer, tmp_path):
    runs = {}
    for gamma in (0.0, 0.01):
        trainer = _trainer(tmp_path / str(gamma), corpus_tokenizer, bias_gamma=gamma, mtp_lambda=0.0)
        runs[gamma] = [trainer.train_step()["maxvio"] for _ in range(30)]
    late = {gamma: sum(v[-10:]) / 10 for gamma, v in runs.items()}
    assert late[0.01] < late[0.0]


def test_mtp_loss_trains_the_mtp_module(corpus_tokenizer, tmp_path):
    trainer = _trainer(tmp_path, corpus_tokenizer, mtp_lambda=0.3)
    batch = next(trainer.data.validation(8, 1))

    def next_next_accuracy() -> float:
        with torch.no_grad():
            out = trainer.model(batch.inputs, mtp=True)
        predicted = out.mtp_logits[0].argmax(-1)
        return (predicted == batch.targets[:, 1:]).float().mean().item()

    before = next_next_accuracy()
    first = trainer.train_step()
    for _ in range(39):
        last = trainer.train_step()
    assert last["mtp"] < first["mtp"] and next_next_accuracy() > before + 0.05


def test_sequence_balance_loss_is_reported_and_differentiable(corpus_tokenizer, tmp_path):
    trainer = _trainer(tmp_path, corpus_tokenizer, balance_alpha=0.01)
    metrics = trainer.train_step()
    assert metrics["balance"] > 0  # sum over layers of sum_i f_i P_i, which is 1 per layer when balanced
    assert 0 < metrics["maxvio_max"] and metrics["tokens_per_s"] > 0


def test_schedules():
    cosine = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert cosine.lr_at(0) == pytest.approx(0.1) and cosine.lr_at(9) == pytest.approx(1.0)
    assert cosine.lr_at(99) == pytest.approx(0.1, abs=1e-3) and cosine.lr_at(55) == pytest.approx(0.55)
    wsd = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert wsd.lr_at(50) == 1.0 and wsd.lr_at(90) == pytest.approx(0.5) and wsd.lr_at(79) == 1.0


def test_pretrain_writes_a_checkpoint_transformers_loads(tmp_path):
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    out = tmp_path / "run"
    result = pretrain(*SMALL_RUN, "--out", str(out), "--max-steps", "6", "--save-every", "3")
    assert "cost:" in result.stdout and "GPU-hours" in result.stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert {"step", "loss", "lr", "tokens_per_s", "maxvio", "mtp"} <= set(lines[0]) and "val_loss" in lines[3]
    latest = out / "latest"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    ours = nanoseek.load_model(latest)
    theirs = DeepseekV3ForCausalLM.from_pretrained(latest, attn_implementation="eager").eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(latest).encode("What is 2 + 3?")])
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() <= 1e-4
    assert Tokenizer.from_dir(latest).encode("What is 2 + 3?") == ids[0].tolist()


def test_pretrain_says_when_its_data_leaves_vocabulary_rows_unused(tmp_path):
    """A tokenizer trained on narrow data stops short of --vocab-size: the message names the size that fits."""
    out = tmp_path / "run"
    result = pretrain("--preset", "tiny", "--vocab-size", "4096", "--corpus-docs", "600", "--seq-len", "32",
                      "--batch-size", "4", "--max-steps", "1", "--eval-batches", "1", "--out", str(out))
    learned = Tokenizer.from_dir(out / "latest").vocab_size
    assert learned < 4096 - 64
    assert f"the tokenizer learned {learned:,} tokens" in result.stdout
    assert f"--vocab-size {-(-learned // 64) * 64} avoids that" in result.stdout
    quiet = pretrain(*SMALL_RUN, "--out", str(tmp_path / "fits"), "--max-steps", "1")
    assert "never be used" not in quiet.stdout


def test_bad_runs_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = pretrain("--preset", "tiny", "--vocab-size", "320", "--data", str(empty), "--out", str(tmp_path / "a"),
                      check=False)
    assert result.returncode == 2 and "no documents" in result.stderr and "Traceback" not in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "wrong field"}\n')
    result = pretrain("--preset", "tiny", "--vocab-size", "320", "--data", str(bad), "--out", str(tmp_path / "b"),
                      check=False)
    assert result.returncode == 2 and "bad.jsonl:2: no field 'text'" in result.stderr
    result = pretrain("--preset", "tiny", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "c"),
                      check=False)
    assert result.returncode == 2 and "nope.txt: no such file" in result.stderr
    result = pretrain("--preset", "tiny", "--vocab-size", "320", "--max-steps", "0", "--out", str(tmp_path / "d"),
                      check=False)
    assert result.returncode == 2 and "--max-steps = 0" in result.stderr
    bad_config = tmp_path / "config.json"
    bad_config.write_text(json.dumps({**nanoseek.preset("tiny").to_dict(), "num_key_value_heads": 2}))
    result = pretrain("--model-config", str(bad_config), "--out", str(tmp_path / "g"), check=False)
    assert result.returncode == 2 and "`num_key_value_heads` = 2: must equal num_attention_heads" in result.stderr
    result = pretrain(*SMALL_RUN, "--out", str(tmp_path / "e"), "--resume", check=False)
    assert result.returncode == 2 and "holds no training checkpoint" in result.stderr
    run = tmp_path / "f"
    pretrain(*SMALL_RUN, "--out", str(run), "--max-steps", "2", "--save-every", "2")
    result = pretrain(*SMALL_RUN, "--out", str(run), "--max-steps", "4", check=False)
    assert result.returncode == 2 and "already holds a run" in result.stderr
    before = os.readlink(run / "latest")
    changed = [a if a != "32" else "16" for a in SMALL_RUN]  # another seq_len
    result = pretrain(*changed, "--out", str(run), "--max-steps", "4", "--resume", check=False)
    assert result.returncode == 2 and "seq_len" in result.stderr
    result = pretrain(*SMALL_RUN, "--preset", "nano", "--out", str(run), "--max-steps", "4", "--resume", check=False)
    assert result.returncode == 2 and "different model" in result.stderr
    assert os.readlink(run / "latest") == before  # nothing half-written


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "nanoseek", "pretrain", *args], capture_output=True, text=True, timeout=600)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ddp_and_fsdp_follow_the_single_process_loss_curve(tmp_path):
    common = [*SMALL_RUN]  # batch 4 per rank
    single = [*SMALL_RUN, "--max-steps", "5", "--save-every", "5"]
    single[single.index("--batch-size") + 1] = "8"  # the same global batch in one process
    pretrain(*single, "--out", str(tmp_path / "one"))
    for parallel in ("ddp", "fsdp"):
        result = _torchrun(*common, "--max-steps", "5", "--save-every", "5", "--parallel", parallel,
                           "--out", str(tmp_path / parallel))
        assert result.returncode == 0, result.stderr[-3000:]
    reference = _losses(tmp_path / "one")
    # DDP averages identical gradients: equal to float rounding. FSDP2 reduce-scatters in another order.
    assert max(abs(a - b) for a, b in zip(_losses(tmp_path / "ddp"), reference, strict=True)) <= 1e-4
    assert max(abs(a - b) for a, b in zip(_losses(tmp_path / "fsdp"), reference, strict=True)) <= 5e-3
    # the sharded run's checkpoint holds the full model, and the run resumes from it
    full = nanoseek.load_model(tmp_path / "fsdp" / "latest")
    assert len(full.mtp) == 1
    result = _torchrun(*common, "--max-steps", "7", "--save-every", "5", "--parallel", "fsdp", "--resume",
                       "--out", str(tmp_path / "fsdp"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_losses(tmp_path / "fsdp")) == 7 and os.readlink(tmp_path / "fsdp" / "latest").endswith("07")


def _weights_from_shards(checkpoint: Path, config) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint's DCP shards, read in this one process into a fresh model."""
    import torch.distributed.checkpoint as dcp

    state = {"model": build_model(config).state_dict()}
    dcp.load(state, checkpoint_id=checkpoint / "dcp", no_dist=True)
    return state["model"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # reading the shards alone is the point
def test_fsdp_trains_and_exports_a_dense_student(tmp_path):
    """A dense model under FSDP: rank 0 rebuilds the family's own model (not DeepSeek's) for the HF export."""
    dense = DenseConfig(model_type="qwen2", vocab_size=320, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, tie_word_embeddings=True)
    (tmp_path / "dense.json").write_text(json.dumps(dense.to_dict()))
    run = [a for a in SMALL_RUN if a not in ("--preset", "tiny")]
    result = _torchrun(*run, "--model-config", str(tmp_path / "dense.json"), "--max-steps", "2", "--parallel", "fsdp",
                       "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    latest = tmp_path / "run" / "latest"
    student = nanoseek.load_model(latest)
    assert isinstance(student, DenseLM) and student.config.to_dict() == dense.to_dict()
    gathered = _weights_from_shards(latest, dense)
    exported = student.state_dict()
    assert gathered.keys() == exported.keys()
    for name, value in exported.items():
        assert torch.equal(value, gathered[name]), name


def _rewound_copy(run: Path, to: Path, step: int) -> Path:
    """A copy of `run` as a run killed right after its step-`step` checkpoint would have left it."""
    shutil.copytree(run, to, symlinks=True)
    for later in (to / "checkpoints").glob("step-*"):
        if int(later.name.removeprefix("step-")) > step:
            shutil.rmtree(later)
    (to / "latest").unlink()
    (to / "latest").symlink_to(f"checkpoints/step-{step:08d}")
    return to


def test_sharded_fsdp_checkpoints_resume_on_two_ranks_and_on_one(tmp_path):
    run = [*SMALL_RUN, "--max-steps", "4", "--save-every", "2", "--eval-every", "100", "--parallel", "fsdp"]
    result = _torchrun(*run, "--out", str(tmp_path / "whole"))
    assert result.returncode == 0, result.stderr[-3000:]
    middle = tmp_path / "whole" / "checkpoints" / "step-00000002"
    # each rank's own shards and the training state; no full-model or full-optimizer file gathered to rank 0
    assert sorted(p.name for p in middle.iterdir()) == ["dcp", "tokenizer.json", "tokenizer_config.json",
                                                        "trainer_state.json"]
    assert sorted(p.name for p in (middle / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    expected = load_file(tmp_path / "whole" / "latest" / "model.safetensors")  # the export at the end of the run
    two = _rewound_copy(tmp_path / "whole", tmp_path / "two", 2)
    result = _torchrun(*run, "--out", str(two), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    got = load_file(two / "latest" / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert _losses(two) == _losses(tmp_path / "whole")
    one = _rewound_copy(tmp_path / "whole", tmp_path / "one", 2)
    single = [*run, "--out", str(one), "--resume"]
    single[single.index("--batch-size") + 1] = "8"  # one process takes both ranks' rows: the same data order
    pretrain(*single)
    got = load_file(one / "latest" / "model.safetensors")
    # One process sums the gradient in another order than FSDP's reduce-scatter: float rounding, which Adam's
    # normalised update can turn into up to about one learning rate (3e-3) per step where a gradient is near 0.
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-2
    assert max(abs(a - b) for a, b in zip(_losses(one), _losses(tmp_path / "whole"), strict=True)) <= 1e-3


def test_chat_data_learns_only_assistant_tokens(corpus_tokenizer, tmp_path):
    from nanoseek.data import ChatSequences, read_conversations, tokenize_conversation

    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                    {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n5"},
                    {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "8"}]
    ids, learn = tokenize_conversation(corpus_tokenizer, conversation)
    assert corpus_tokenizer.decode(ids, skip_special_tokens=False) == corpus_tokenizer.apply_chat_template(
        conversation, add_generation_prompt=False)
    learned = corpus_tokenizer.decode([t for t, keep in zip(ids, learn, strict=True) if keep],
                                      skip_special_tokens=False)
    assert learned == "<think>\n2 + 3 = 5\n</think>\n5<|end_of_text|>8<|end_of_text|>"
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": conversation}) for _ in range(10)) + "\n")
    data = ChatSequences(read_conversations(path), corpus_tokenizer, seq_len=64, seed=0)
    batch = data.next_batch(2)
    assert ((batch.targets != -100).sum(1) == sum(learn[1:])).all()  # a target is the next token
    torch.manual_seed(0)
    model = nanoseek.CausalLM(nanoseek.preset("tiny", vocab_size=corpus_tokenizer.vocab_size))
    trainer = Trainer(model, corpus_tokenizer, data, TrainConfig(max_steps=20, batch_size=4, seq_len=64,
                                                                   warmup_steps=2, eval_every=100), tmp_path / "run")
    first = trainer.train_step()["ce"]
    for _ in range(19):
        last = trainer.train_step()["ce"]
    assert last < first / 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": conversation}) + "\n" + json.dumps({"messages": "hi"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:2: field 'messages' must be a list"):
        read_conversations(bad)


def test_more_bad_input(tmp_path, corpus_tokenizer):
    with pytest.raises(ValueError, match="--eval-batches = 0"):
        TrainConfig(eval_batches=0).validate()
    for name in ("bias_gamma", "mtp_lambda", "balance_alpha"):
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} = -1"):
            TrainConfig(**{name: -1}).validate()
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="latin.jsonl:2: not UTF-8"):
        list(read_documents([latin]))
    empty = tmp_path / "empty.txt"
    empty.write_text("   ")
    result = pretrain("--preset", "tiny", "--vocab-size", "320", "--data", str(empty), "--out", str(tmp_path / "a"),
                      check=False)
    assert result.returncode == 2 and not (tmp_path / "a" / "tokenizer").exists()  # nothing kept from a failed run
    data = tmp_path / "a.jsonl"
    data.write_text("\n".join(json.dumps({"text": doc}) for doc in generate_corpus(300)) + "\n")
    run = [*SMALL_RUN, "--data", str(data), "--out", str(tmp_path / "b"), "--max-steps", "2", "--save-every", "2"]
    pretrain(*run)
    data.write_text("\n".join(json.dumps({"text": doc}) for doc in generate_corpus(200, seed=9)) + "\n")
    result = pretrain(*run[:-4], "--max-steps", "4", "--save-every", "2", "--resume", check=False)
    assert result.returncode == 2 and "trained on other data" in result.stderr


def test_balance_loss_is_one_per_layer_when_perfectly_balanced():
    from nanoseek.model import ModelOutput, RouterStats
    from nanoseek.train.losses import sequence_balance_loss

    experts, top_k, steps = 8, 2, 4  # each token picks 2 of 8 experts, every expert picked once per sequence
    indices = torch.arange(experts).view(steps, top_k)
    scores = torch.full((steps, experts), 0.5, requires_grad=True)
    out = ModelOutput(torch.zeros(1, steps, 3), torch.zeros(1, steps, 3),
                      router_stats=[RouterStats(scores, indices, torch.ones(experts))] * 3)
    loss = sequence_balance_loss(out, batch=1, top_k=top_k)
    assert loss.item() == pytest.approx(3.0)  # sum over 3 layers of sum_i f_i P_i = 1
    loss.backward()
    assert scores.grad is not None
    skewed = torch.zeros(steps, top_k, dtype=torch.long)
    skewed[:, 1] = 1  # all tokens to experts 0 and 1
    peaked = torch.full((steps, experts), 0.1)
    peaked[:, :2] = 0.9
    out = ModelOutput(torch.zeros(1, steps, 3), torch.zeros(1, steps, 3),
                      router_stats=[RouterStats(peaked, skewed, torch.ones(experts))])
    assert sequence_balance_loss(out, batch=1, top_k=top_k).item() > 2.0


def test_padding_is_not_counted_as_expert_load():
    """SFT and GRPO batches are padded: the routed counts that drive the bias update cover real tokens only."""
    from nanoseek.model import ModelOutput, RouterStats
    from nanoseek.train.losses import add_routed_counts

    indices = torch.tensor([[0, 1], [1, 2], [3, 3], [3, 3]])  # four tokens: two real, two padding
    out = ModelOutput(torch.zeros(1), torch.zeros(1), router_stats=[RouterStats(torch.zeros(4, 4), indices,
                                                                                torch.tensor([1., 2., 1., 4.]))])
    counts = [torch.zeros(4)]
    add_routed_counts(counts, out, torch.tensor([[True, True, False, False]]))
    assert counts[0].tolist() == [1, 2, 1, 0]
    add_routed_counts(counts, out, None)
    assert counts[0].tolist() == [2, 4, 2, 4]


def test_a_resume_from_shards_keeps_this_runs_optimizer_settings(tmp_path):
    """dcp.load fills the state dict in place: this run's hyperparameters must still win, as on the other paths."""
    from nanoseek.train.checkpointing import load_shards, save_shards

    torch.manual_seed(0)
    model = nanoseek.CausalLM(nanoseek.preset("tiny"))
    saved = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.5, betas=(0.8, 0.9))
    model(torch.randint(0, 128, (1, 8))).sum().backward()
    saved.step()
    save_shards(model, saved, tmp_path / "dcp")
    model.zero_grad(set_to_none=True)  # as in a fresh run, where the optimizer's state is built on load
    resumed = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    load_shards(model, resumed, tmp_path / "dcp")
    assert resumed.param_groups[0]["weight_decay"] == 0.1 and resumed.param_groups[0]["betas"] == (0.9, 0.95)
    for param, moments in saved.state.items():  # the moments came back
        assert torch.equal(resumed.state[param]["exp_avg_sq"], moments["exp_avg_sq"])
    # the MTP module had no gradient, so no saved state: it keeps its fresh zeros instead of failing the load
    assert all(not resumed.state[p]["exp_avg"].any() for p in model.mtp.parameters())


def test_balance_loss_on_a_model_without_routers_is_refused(tmp_path):
    from nanoseek.config import DenseConfig
    from nanoseek.model import DenseLM

    dense = DenseLM(DenseConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    with pytest.raises(ValueError, match="--balance-alpha = 0.0001: this model has no router"):
        Trainer(dense, None, None, TrainConfig(balance_alpha=1e-4), tmp_path)
