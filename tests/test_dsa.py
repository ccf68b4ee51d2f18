"""DeepSeek-V3.2's sparse attention (`model_type: deepseek_v32`): logit parity with transformers'
DeepseekV32ForCausalLM (fp32, eager) on sequences longer than `index_topk`, weights exchanged both ways, the
caches, and the config."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import perturb, tiny_config

import nanoseek
from nanoseek.config import ConfigError, DeepSeekV32Config, ModelConfig, config_from_dict, preset, read_config_file
from nanoseek.sizing import index_cache_bytes_per_token, kv_cache_bytes_per_token

TOL = 1e-4
# Eight indexer heads make an exact tie of index scores (every head's ReLU zero for two keys) vanishingly rare;
# top-8 of up to 40 keys makes the selection matter.
INDEXER = {"index_n_heads": 8, "index_head_dim": 16, "index_topk": 8}
CASES = {"base": {}, "no-yarn": {"rope_scaling": None}, "all-moe": {"first_k_dense_replace": 0}}


def v32_kwargs(**overrides) -> dict:
    return tiny_config(**{**INDEXER, **overrides})


def hf_v32(seed: int = 0, **overrides):
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV32Config(**v32_kwargs(**overrides), attn_implementation="eager")
    return perturb(DeepseekV32ForCausalLM(config).eval(), seed)


def ours_v32(seed: int = 0, **overrides) -> nanoseek.CausalLM:
    torch.manual_seed(seed)
    return perturb(nanoseek.CausalLM(DeepSeekV32Config(**v32_kwargs(**overrides))).eval(), seed)


def _ids(batch: int = 2, steps: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, steps), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_checkpoint_loads_with_equal_logits(case, tmp_path):
    hf = hf_v32(**CASES[case])
    hf.save_pretrained(tmp_path)
    ours = nanoseek.load_model(tmp_path)
    assert isinstance(ours.config, DeepSeekV32Config) and ours.config.index_topk == 8
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        assert (ours(ids) - expected).abs().max() <= TOL
        assert (ours(ids, absorbed=True) - expected).abs().max() <= TOL
        dense = ours_from(ours, index_topk=ids.shape[1])
        assert (dense(ids) - expected).abs().max() > 1e-2, "the selection should matter at this length"


def ours_from(model: nanoseek.CausalLM, **changes) -> nanoseek.CausalLM:
    """The same weights under a changed config."""
    config = DeepSeekV32Config(**{**model.config.__dict__, **changes})
    other = nanoseek.CausalLM(config, num_mtp_modules=len(model.mtp)).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("case", ["base", "no-yarn"])
def test_nanoseek_checkpoint_with_mtp_loads_in_transformers(case, tmp_path):
    from transformers import DeepseekV32ForCausalLM

    ours = ours_v32(num_nextn_predict_layers=1, **CASES[case])
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "deepseek_v32" and written["architectures"] == ["DeepseekV32ForCausalLM"]
    hf, info = DeepseekV32ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # transformers does not model the MTP module (layer 3 here), so its weights are the only unexpected ones
    assert info["unexpected_keys"] and all(k.startswith("model.layers.3.") for k in info["unexpected_keys"])
    assert any(".indexer.wq_b." in k for k in info["unexpected_keys"])  # the MTP block has its own indexer
    ids = _ids()
    with torch.no_grad():
        assert (hf.eval()(ids).logits - ours(ids)).abs().max() <= TOL
    again = nanoseek.load_model(tmp_path)
    assert len(again.mtp) == 1
    assert torch.equal(again.mtp[0].self_attn.indexer.wk.weight, ours.mtp[0].self_attn.indexer.wk.weight)


@pytest.mark.parametrize("absorbed", [True, False])
def test_token_by_token_decode_equals_full_forward(absorbed):
    model = ours_v32()
    ids = _ids(steps=36)
    cache = model.new_cache(num_slots=2, max_len=36)
    with torch.no_grad():
        full = model(ids)
        for t in range(ids.shape[1]):
            step = model(ids[:, t:t + 1], torch.full((2, 1), t), cache, absorbed=absorbed)
            assert (step[:, 0] - full[:, t]).abs().max() <= TOL, f"position {t}"


def test_chunked_prefill_in_other_slots_then_decode():
    """Prefill in chunks over the cache (the expanded path with the cache's mask), rows in arbitrary slots."""
    model = ours_v32()
    ids = _ids(steps=34)
    cache = model.new_cache(num_slots=4, max_len=40)
    slots = torch.tensor([3, 1])
    with torch.no_grad():
        full = model(ids)
        first = model(ids[:, :5], cache=cache, slots=slots)  # within index_topk: dense
        assert (first - full[:, :5]).abs().max() <= TOL
        chunk = model(ids[:, 5:20], torch.arange(5, 20).expand(2, -1), cache, slots=slots)
        assert (chunk - full[:, 5:20]).abs().max() <= TOL
        chunk = model(ids[:, 20:30], torch.arange(20, 30).expand(2, -1), cache, slots=slots, absorbed=True)
        assert (chunk - full[:, 20:30]).abs().max() <= TOL
        for t in range(30, 34):
            step = model(ids[:, t:t + 1], torch.full((2, 1), t), cache, slots=slots)
            assert (step[:, 0] - full[:, t]).abs().max() <= TOL


def test_rows_at_different_lengths_in_scattered_slots_decode_as_each_alone():
    """Sparse decode of rows in scattered slots (a row at a time over views of each slot) at other lengths,
    each past index_topk: every row's logits are its own sequence's."""
    model = ours_v32()
    a, b = _ids(batch=1, steps=30, seed=2), _ids(batch=1, steps=16, seed=3)
    cache = model.new_cache(num_slots=4, max_len=32)
    with torch.no_grad():
        full_a, full_b = model(a), model(b)
        model(a[:, :20], cache=cache, slots=torch.tensor([3]))
        model(b[:, :9], cache=cache, slots=torch.tensor([0]))
        for step in range(7):
            ids = torch.tensor([[a[0, 20 + step]], [b[0, 9 + step]]])
            logits = model(ids, torch.tensor([[20 + step], [9 + step]]), cache, slots=torch.tensor([3, 0]))
            assert (logits[0, 0] - full_a[0, 20 + step]).abs().max() <= TOL
            assert (logits[1, 0] - full_b[0, 9 + step]).abs().max() <= TOL


def test_int8_index_keys_of_rows_in_scattered_slots_are_each_rows_own():
    """The same over int8 indexer keys (views of each slot's int8 keys and scales): every row decodes as it does
    alone in a cache of its own."""
    model = ours_v32()
    rows, prefixes, slots = (_ids(batch=1, steps=30, seed=2), _ids(batch=1, steps=16, seed=3)), (20, 9), (3, 0)
    shared = model.new_cache(num_slots=4, max_len=32, index_dtype=torch.int8)
    alone = [model.new_cache(num_slots=1, max_len=32, index_dtype=torch.int8) for _ in rows]
    with torch.no_grad():
        for ids, prefix, slot, own in zip(rows, prefixes, slots, alone, strict=True):
            model(ids[:, :prefix], cache=shared, slots=torch.tensor([slot]))
            model(ids[:, :prefix], cache=own)
        for step in range(7):
            ids = torch.tensor([[row[0, prefix + step]] for row, prefix in zip(rows, prefixes, strict=True)])
            positions = torch.tensor([[prefix + step] for prefix in prefixes])
            logits = model(ids, positions, shared, slots=torch.tensor(slots))
            for b, own in enumerate(alone):
                expected = model(ids[b:b + 1], positions[b:b + 1], own)
                assert (logits[b] - expected[0]).abs().max() <= TOL, (step, b)


def test_dense_attention_within_index_topk_is_deepseek_v3():
    """While no query sees more than index_topk keys, V3.2 is V3 with the same weights."""
    v32 = ours_v32(index_topk=64)
    v3 = nanoseek.CausalLM(ModelConfig(**tiny_config())).eval()
    v3.load_state_dict({k: v for k, v in v32.state_dict().items() if ".indexer." not in k})
    ids = _ids()
    with torch.no_grad():
        assert (v32(ids) - v3(ids)).abs().max() <= TOL


def test_cache_holds_the_latent_and_the_indexer_key():
    model = ours_v32()
    cache = model.new_cache(num_slots=1, max_len=8)
    config = model.config
    per_layer = config.kv_lora_rank + config.qk_rope_head_dim + config.index_head_dim
    assert cache.bytes_per_token() == per_layer * config.num_hidden_layers * 4
    assert kv_cache_bytes_per_token(config, 4)[0] == cache.bytes_per_token()


def test_sizing_reproduces_deepseek_v32_published_cache():
    """DeepSeek-V3.2-Exp caches each indexer key as 128 FP8 values and one fp32 scale: 132 B per layer,
    8,052 B per token over 61 layers, beside the 70,272 B bf16 latent (576 values x 61 layers x 2 B)."""
    config = preset("deepseek-v3.2")
    assert index_cache_bytes_per_token(config, 2) == (128 * 61 * 2, 8052)
    latent, _ = kv_cache_bytes_per_token(preset("deepseek-v3"), 2)
    assert latent == 70272 and kv_cache_bytes_per_token(config, 2)[0] == 70272 + 128 * 61 * 2


def test_info_reports_the_indexer_cache(capsys):
    from nanoseek.cli import main

    assert main(["info", "--preset", "deepseek-v3.2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "DeepseekV32ForCausalLM"
    assert report["index_cache_fp8_bytes_per_token"] == 8052
    assert report["index_cache_bytes_per_token"] == 128 * 61 * 2


def test_config_round_trips_with_transformers(tmp_path):
    from transformers import DeepseekV32Config

    DeepseekV32Config(**v32_kwargs()).save_pretrained(tmp_path)  # transformers 5.x form: rope_parameters
    config = read_config_file(tmp_path / "config.json")
    assert isinstance(config, DeepSeekV32Config)
    assert (config.index_n_heads, config.index_head_dim, config.index_topk) == (8, 16, 8)
    assert config.rope_scaling["factor"] == 40
    (tmp_path / "ours.json").write_text(json.dumps(config.to_dict()))
    again = DeepseekV32Config.from_json_file(tmp_path / "ours.json")
    assert (again.index_n_heads, again.index_head_dim, again.index_topk) == (8, 16, 8)
    assert again.mlp_layer_types == ["dense", "sparse", "sparse"]
    assert DeepSeekV32Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(("change", "field"), [
    ({"q_lora_rank": None}, "q_lora_rank"),
    ({"rope_interleave": False}, "rope_interleave"),
    ({"index_head_dim": 4}, "index_head_dim"),
    ({"index_topk": 0}, "index_topk"),
    ({"mlp_layer_types": ["sparse", "sparse", "sparse"]}, "mlp_layer_types"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types"),
])
def test_bad_config_names_the_field(change, field):
    raw = {**DeepSeekV32Config(**v32_kwargs()).to_dict(), **change}
    with pytest.raises(ConfigError, match=f"`{field}`"):
        config_from_dict(raw)


def test_from_v3_adds_the_indexer_and_keeps_every_field():
    v3 = preset("tiny", extra={"ep_size": 1})
    v32 = DeepSeekV32Config.from_v3(v3, **INDEXER)
    assert v32.to_dict() == {**v3.to_dict(), **INDEXER, "model_type": "deepseek_v32",
                             "architectures": ["DeepseekV32ForCausalLM"]}


# ---- training: the two stages' losses (V3.2-Exp report §2.1.1) ------------------------------------------
def test_indexer_loss_is_the_kl_of_the_attention_to_the_index_softmax():
    from nanoseek.model.indexer import indexer_loss

    target = torch.tensor([[[0.5, 0.3, 0.2]]])
    scores = torch.tensor([[[0.25, 0.25, 0.5]]]).log()
    every = torch.ones(1, 1, 3, dtype=torch.bool)
    expected = sum(p * math.log(p / q) for p, q in [(0.5, 0.25), (0.3, 0.25), (0.2, 0.5)])
    assert indexer_loss(scores, target, every).item() == pytest.approx(expected, rel=1e-6)
    first_two = torch.tensor([[[True, True, False]]])  # p renormalised to (0.625, 0.375), softmax(I) to halves
    expected = 0.625 * math.log(0.625 / 0.5) + 0.375 * math.log(0.375 / 0.5)
    assert indexer_loss(scores, target, first_two).item() == pytest.approx(expected, rel=1e-6)


def _transformers_indexer_terms(hf, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(index scores I [B, T, T] by the report's eq. 1 from transformers' own modules, main attention
    probabilities averaged over heads [B, T, T]) of every layer, from transformers' forward pass."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

    inputs = []
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append((module, kwargs)), with_kwargs=True) for layer in hf.model.layers]
    with torch.no_grad():
        attentions = hf(ids, output_attentions=True).attentions
    for hook in hooks:
        hook.remove()
    terms = []
    for (attn, kwargs), probs in zip(inputs, attentions, strict=True):
        x, (cos, sin), indexer = kwargs["hidden_states"], kwargs["position_embeddings"], attn.indexer
        batch, steps = x.shape[:2]
        rope = hf.config.qk_rope_head_dim
        with torch.no_grad():
            q = indexer.wq_b(attn.q_a_layernorm(attn.q_a_proj(x))).view(batch, steps, indexer.n_heads, -1)
            k = indexer.k_norm(indexer.wk(x))[:, :, None]
            q_rot, k_rot = apply_rotary_pos_emb(q[..., :rope], k[..., :rope], cos, sin, unsqueeze_dim=2)
            q, k = torch.cat((q_rot, q[..., rope:]), -1), torch.cat((k_rot, k[..., rope:]), -1)[:, :, 0]
            logits = torch.einsum("bshd,btd->bsht", q, k).relu() * indexer.head_dim ** -0.5
            weights = indexer.weights_proj(x) * indexer.n_heads ** -0.5
            index = torch.einsum("bsh,bsht->bst", weights, logits)
        terms.append((index, probs.mean(dim=1)))
    return terms


def _kl(index: torch.Tensor, probs: torch.Tensor, keep: torch.Tensor) -> float:
    p = probs * keep
    p = p / p.sum(-1, keepdim=True)
    log_q = index.masked_fill(~keep, float("-inf")).log_softmax(-1)
    return torch.where(keep, p * (p.clamp_min(1e-30).log() - log_q), 0.0).sum(-1).mean().item()


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_stage_losses_and_recall_match_transformers_attention(mode, tmp_path):
    """The warm-up's loss (dense attention, every causal key) and the sparse stage's (the selected keys), and
    the recall, computed independently from transformers' attention probabilities and the report's eq. 1."""
    hf = hf_v32()  # transformers' attention is the deployed one: sparse at top-8, dense at top-64
    hf.save_pretrained(tmp_path)
    ours = nanoseek.load_model(tmp_path).train()
    ids = _ids(steps=24)
    out = ours.run(ids, dsa=mode)
    assert len(out.indexer_stats) == ours.config.num_hidden_layers
    dense_hf = hf_v32(index_topk=64)
    dense_hf.load_state_dict(hf.state_dict())
    sparse_terms, dense_terms = _transformers_indexer_terms(hf, ids), _transformers_indexer_terms(dense_hf, ids)
    causal = torch.ones(24, 24, dtype=torch.bool).tril().expand(2, -1, -1)
    for layer, (stats, (sparse_index, sparse), (dense_index, dense)) in enumerate(zip(
            out.indexer_stats, sparse_terms, dense_terms, strict=True)):
        # each layer's input is the output of the layers below, dense in the warm-up, sparse after it
        index, probs = (dense_index, dense) if mode == "dense" else (sparse_index, sparse)
        chosen = index.masked_fill(~causal, float("-inf")).topk(8, dim=-1).indices
        selected = torch.zeros_like(causal).scatter(-1, chosen, True) & causal
        keep = causal if mode == "dense" else selected
        assert stats.loss.item() == pytest.approx(_kl(index, probs, keep), rel=1e-4, abs=1e-6)
        assert 0 < stats.recall.item() < 1
        if mode == "dense" or layer == 0:  # above layer 0 the sparse stage's dense reference has other inputs
            beyond = causal.sum(-1) > 8  # recall counts the queries that see more than k keys
            expected = (dense * selected).sum(-1)[beyond].mean().item()
            assert stats.recall.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_indexer_learns_only_from_its_loss(mode):
    """The indexer's inputs are detached: the language-model loss reaches every weight but the indexer's,
    the indexer loss the indexer's alone."""
    model = ours_v32(num_nextn_predict_layers=1).train()
    ids = _ids(steps=24)
    out = model.run(ids, dsa=mode, mtp=True)
    assert len(out.indexer_stats) == model.config.num_hidden_layers + 1  # the MTP block's indexer too
    index_loss = sum(s.loss for s in out.indexer_stats)
    index_grads = torch.autograd.grad(index_loss, list(model.parameters()), allow_unused=True, retain_graph=True)
    lm_loss = out.logits.logsumexp(-1).mean() + sum(m.logsumexp(-1).mean() for m in out.mtp_logits)
    lm_grads = torch.autograd.grad(lm_loss, list(model.parameters()), allow_unused=True)
    for (name, _), from_index, from_lm in zip(model.named_parameters(), index_grads, lm_grads, strict=True):
        if ".indexer." in name:
            assert from_index is not None and from_index.abs().sum() > 0, name
            assert from_lm is None, name
        else:
            assert from_index is None, name


def test_dsa_needs_an_indexer():
    with pytest.raises(ValueError, match="dsa"):
        nanoseek.CausalLM(ModelConfig(**tiny_config())).run(_ids(), dsa="dense")


# ---- the training stages in the loop, and `nanoseek pretrain` ----------------------------------------------
def _dsa_trainer(tmp_path, **changes):
    from nanoseek.data import PackedSequences, TokenStream, build_shards
    from nanoseek.model import add_indexer
    from nanoseek.tasks.corpus import generate_corpus
    from nanoseek.tokenizer import train_tokenizer
    from nanoseek.train import TrainConfig, Trainer

    tokenizer = train_tokenizer(generate_corpus(300, seed=1), 300)
    manifest = build_shards(generate_corpus(400, seed=0), tokenizer, tmp_path / "data", "test")
    config = TrainConfig(**{"max_steps": 30, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "warmup_steps": 2,
                            "eval_every": 1000, "save_every": 1000, **changes})
    data = PackedSequences(TokenStream(tmp_path / "data", manifest), config.seq_len, config.seed)
    torch.manual_seed(0)
    v3 = nanoseek.CausalLM(preset("tiny", vocab_size=tokenizer.vocab_size, num_nextn_predict_layers=1))
    return Trainer(add_indexer(v3, **INDEXER), tokenizer, data, config, tmp_path / "run")


def test_warmup_trains_only_the_indexers_then_sparse_training_trains_everything(tmp_path):
    trainer = _dsa_trainer(tmp_path, dsa_warmup_steps=12, max_steps=14)
    model = trainer.model
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    warmup = [trainer.train_step() for _ in range(12)]
    assert all(m["lr"] == 1e-3 for m in warmup)
    after = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for name, tensor in after.items():
        changed = not torch.equal(tensor, before[name])
        assert changed == (".indexer." in name), name  # router biases too stay put in the warm-up
    # the warm-up's loss is a KL over every causal key, so it falls as the indexer learns the attention
    assert sum(m["index_loss"] for m in warmup[-3:]) < sum(m["index_loss"] for m in warmup[:3])
    assert all(0 < m["index_recall"] <= 1 for m in warmup)
    sparse = trainer.train_step()
    assert sparse["lr"] == pytest.approx(1.5e-3)  # --lr's schedule starts after the warm-up
    moved = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, after[name])}
    assert any(".indexer." in name for name in moved) and any(".experts." in name for name in moved)
    assert "index_loss" in sparse and trainer.evaluate()["val_index_recall"] > 0


def test_pretrain_converts_a_v3_checkpoint_into_v32_that_transformers_loads(tmp_path):
    from test_train import SMALL_RUN, pretrain
    from transformers import DeepseekV32ForCausalLM

    pretrain(*SMALL_RUN, "--out", str(tmp_path / "v3"), "--max-steps", "2")
    out = tmp_path / "v32"
    sizes = ["--index-topk", "8", "--index-n-heads", "8", "--index-head-dim", "16"]
    common = ["--corpus-docs", "600", "--seq-len", "32", "--batch-size", "4", "--eval-every", "2",
              "--eval-batches", "1", "--init", str(tmp_path / "v3" / "latest")]
    result = pretrain(*common, *sizes, "--dsa-warmup-steps", "2", "--dsa-steps", "2", "--out", str(out))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4] and "val_index_recall" in lines[-1]
    assert all("index_loss" in m for m in lines), result.stdout
    ours = nanoseek.load_model(out / "latest")
    assert isinstance(ours.config, DeepSeekV32Config) and ours.config.index_topk == 8
    theirs = DeepseekV32ForCausalLM.from_pretrained(out / "latest", attn_implementation="eager").eval()
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() <= TOL
    refused = {
        "--dsa-warmup-steps": pretrain(*common, "--dsa-warmup-steps", "1", "--max-steps", "2", "--out",
                                       str(tmp_path / "a"), check=False),
        "--index-topk": pretrain(*common[:-1], str(out / "latest"), "--index-topk", "4", "--max-steps", "1",
                                 "--out", str(tmp_path / "b"), check=False),
        "--dsa-steps": pretrain(*common, *sizes, "--dsa-warmup-steps", "1", "--dsa-steps", "2", "--max-steps", "5",
                                "--out", str(tmp_path / "c"), check=False),
    }
    for flag, run in refused.items():
        assert run.returncode != 0 and flag in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_dsa_stages_under_ddp_follow_the_single_process_run(tmp_path):
    """The warm-up (only the indexer learns) and sparse training on two DDP ranks of batch 4 give the losses of
    one process at batch 8: the frozen model's unused gradients do not trip DDP's reducer."""
    from test_train import SMALL_RUN, _torchrun, pretrain

    pretrain(*SMALL_RUN, "--out", str(tmp_path / "v3"), "--max-steps", "2")
    common = ["--corpus-docs", "600", "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1", "--init",
              str(tmp_path / "v3" / "latest"), "--index-topk", "8", "--index-n-heads", "8", "--index-head-dim", "16",
              "--dsa-warmup-steps", "2", "--dsa-steps", "2"]
    pretrain(*common, "--batch-size", "8", "--out", str(tmp_path / "one"))
    result = _torchrun(*common, "--batch-size", "4", "--parallel", "ddp", "--out", str(tmp_path / "ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    one, ddp = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                for run in ("one", "ddp"))
    assert len(one) == len(ddp) == 4
    for a, b in zip(one, ddp, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 and a["index_loss"] == pytest.approx(b["index_loss"], rel=1e-3)


# ---- the engine over the caches --------------------------------------------------------------------------------
def _greedy(tokens: int = 40):
    from nanoseek import SamplingParams

    return SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)


def _prompts(*lengths: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(2, 128, (n,), generator=gen).tolist() for n in lengths]


def test_engine_greedy_matches_transformers_generate_past_index_topk(tmp_path):
    """Contexts grow from 3-23 tokens to 43-63, well past top-8: transformers' own sparse decode over its
    indexer cache is the reference."""
    from nanoseek import LLM

    hf = hf_v32()
    hf.save_pretrained(tmp_path)
    batch = _prompts(7, 23, 3, 15)
    got = LLM(tmp_path, max_num_seqs=4).generate(batch, _greedy())
    for prompt, out in zip(batch, got, strict=True):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == expected


@pytest.fixture
def v32_checkpoint(tmp_path):
    path = tmp_path / "v32"
    ours_v32(num_nextn_predict_layers=1).save_pretrained(path)
    return path


def test_speculation_prefix_cache_and_compiled_decode_keep_greedy_tokens(v32_checkpoint):
    from nanoseek import LLM

    plain = LLM(v32_checkpoint, max_num_seqs=4)
    shared = [3 + (i * 7) % 120 for i in range(40)]
    batch = [shared + [5 + i] * extra for i, extra in enumerate((3, 9, 20))] + [shared[:32]]
    expected = [o.outputs[0].token_ids for o in plain.generate(batch, _greedy())]
    speculative = LLM(v32_checkpoint, max_num_seqs=4, speculative=True).generate(batch, _greedy())
    assert [o.outputs[0].token_ids for o in speculative] == expected
    assert all(o.metrics["draft_tokens"] > 0 for o in speculative)
    cached = LLM(plain.model, max_num_seqs=4, prefix_cache_tokens=256)
    cached.generate(batch[:1], _greedy())
    outputs = cached.generate(batch, _greedy())
    assert [o.outputs[0].token_ids for o in outputs] == expected and outputs[1].num_cached_tokens == 32
    compiled = LLM(v32_checkpoint, max_num_seqs=4, compile=True).generate(batch, _greedy())
    assert [o.outputs[0].token_ids for o in compiled] == expected


def test_gguf_export_refuses_what_llama_cpp_would_run_densely(v32_checkpoint, tmp_path):
    from nanoseek.gguf_export import ExportError, export_gguf

    with pytest.raises(ExportError, match="deepseek_v32.*index_topk \\(8\\)"):
        export_gguf(nanoseek.load_model(v32_checkpoint), None, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_fp8_indexer_weights_load_dequantised(tmp_path):
    """V3.2's release stores indexer.wq_b and indexer.wk in block FP8 (weights_proj unquantised), like the other
    matrices: read as any block-FP8 weight."""
    from safetensors.torch import load_file, save_file
    from test_fp8 import quantize

    ours_v32().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    expected = {}
    for name in [n for n in tensors if n.endswith(("indexer.wq_b.weight", "indexer.wk.weight"))]:
        tensors[name], tensors[name + "_scale_inv"] = quantize(tensors[name])
        expected[name] = tensors[name].float() * tensors[name + "_scale_inv"]  # one block: the whole matrix
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = nanoseek.load_model(tmp_path).state_dict()
    assert len(expected) == 2 * 3
    for name, weight in expected.items():
        assert torch.equal(loaded[name], weight), name


def test_gathered_sparse_attention_equals_the_masked_form(monkeypatch):
    """Inference gathers each query's top-k latents (in chunks of queries); training masks every other key.
    The two are the same attention, and the chunking changes nothing."""
    from nanoseek.model import attention

    model = ours_v32()
    ids = _ids()
    with torch.no_grad():
        masked = model.run(ids, dsa="sparse").logits
        gathered = model(ids)
        monkeypatch.setattr(attention, "SPARSE_SCORES_ELEMENTS", 1)  # one query per chunk
        monkeypatch.setattr(attention, "SPARSE_GATHER_ELEMENTS", 1)
        one_by_one = model(ids)
    assert (gathered - masked).abs().max() <= TOL and (one_by_one - gathered).abs().max() <= 1e-5


def test_training_without_the_probe_still_reaches_the_attention_weights():
    """A stage that leaves the indexer loss out (GRPO's) trains through the sparse mask: the same logits as
    inference's gathered form, and gradients in MLA's projections."""
    model = ours_v32().train()
    ids = _ids()
    logits = model(ids)
    with torch.no_grad():
        assert (logits - model(ids)).abs().max() <= TOL
    logits.logsumexp(-1).mean().backward()
    attention = model.model.layers[1].self_attn
    for linear in (attention.q_a_proj, attention.q_b_proj, attention.kv_a_proj_with_mqa, attention.kv_b_proj):
        assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    assert attention.indexer.wk.weight.grad is None


def test_bf16_keeps_the_head_weights_fp32_and_quantizing_leaves_them_float():
    model = ours_v32().to(torch.bfloat16)
    indexer = model.model.layers[0].self_attn.indexer
    assert indexer.weights_proj.weight.dtype == torch.float32 and indexer.wk.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(_ids()).dtype == torch.bfloat16
    quantized = ours_v32().quantize("int8")
    weights_proj = quantized.model.layers[0].self_attn.indexer.weights_proj
    assert isinstance(weights_proj, torch.nn.Linear) and weights_proj.weight.dtype == torch.float32


def test_flops_count_the_sparse_attention_absorbed_and_the_indexer():
    from nanoseek.sizing import forward_flops_per_token

    c = preset("deepseek-v3.2")
    assert forward_flops_per_token(c, 2048)[1] == forward_flops_per_token(preset("deepseek-v3"), 2048)[1]
    per_layer = 2 * 128 * (2 * 512 + 64) * 2048 + 2 * 64 * 128 * 65536
    assert forward_flops_per_token(c, 65536)[1] == 61 * per_layer


# ---- int8 indexer keys and the selection ------------------------------------------------------------------
def test_highest_positions_are_topk_in_position_order():
    """The threshold selection (a few long rows) and the topk one (many rows) give topk's set, ascending, under
    torch.compile too; keys hidden by -inf never win, and ties still give k distinct positions."""
    from nanoseek.model.indexer import highest_positions

    gen = torch.Generator().manual_seed(0)
    for rows, length, k in ((1, 4096, 256), (3, 5000, 512), (20, 3000, 256), (2, 700, 256)):
        scores = torch.randn(rows, length, generator=gen).relu_() * torch.rand(rows, length, generator=gen)
        scores[:, : length // 3] = float("-inf")
        expected = scores.topk(k, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(highest_positions(scores, k), expected), (rows, length, k)
    row = torch.randn(1, 4096, generator=gen)  # long enough for the threshold
    compiled = torch.compile(lambda s: highest_positions(s, 256), fullgraph=True)
    assert torch.equal(compiled(row), row.topk(256).indices.sort().values)
    ties = torch.zeros(1, 4096)
    ties[0, [5, 3000]] = 1.0
    chosen = highest_positions(ties, 256)[0]
    assert chosen.unique().numel() == 256 and bool((chosen.diff() > 0).all()) and {5, 3000} <= set(chosen.tolist())
    # a few rows: one tied, one seeing fewer than k keys, one whose sample misleads
    scores = torch.randn(3, 4096, generator=gen)
    scores[0] = 0.0
    scores[1, 100:] = float("-inf")
    scores[2, ::16] = -10.0
    scores[2, : 20 * 16 : 16] = 10.0
    chosen = highest_positions(scores, 256)
    assert bool((chosen.diff(dim=-1) > 0).all())
    assert torch.equal(scores.gather(-1, chosen).sort(dim=-1).values, scores.topk(256).values.sort(dim=-1).values)


def _indexer_inputs(model: nanoseek.CausalLM, steps: int, keys: int):
    c, gen = model.config, torch.Generator().manual_seed(4)
    x, q_compressed = torch.randn(1, steps, c.hidden_size, generator=gen), torch.randn(
        1, steps, c.q_lora_rank, generator=gen)
    cos, sin = model.rotary(torch.arange(keys, keys + steps)[None], x.dtype)
    return x, q_compressed, cos, sin, torch.randn(1, keys, c.index_head_dim, generator=gen)


@pytest.mark.parametrize("steps", [1, 6])  # 8 heads: one query's 8 rows take torch._int_mm, 48 the float product
def test_int8_index_scores_are_eq1_over_the_quantised_queries_and_keys(steps):
    from nanoseek.model.indexer import quantize_int8

    model = ours_v32()
    indexer = model.model.layers[1].self_attn.indexer
    x, q_compressed, cos, sin, keys = _indexer_inputs(model, steps, 300)
    with torch.no_grad():
        got = indexer.scores(x, q_compressed, cos, sin, quantize_int8(keys))
        q = indexer._rope(indexer.wq_b(q_compressed).view(1, steps, indexer.num_heads, -1), cos[..., None, :],
                          sin[..., None, :])
        q8, k8 = quantize_int8(q), quantize_int8(keys)
        logits = torch.einsum("bthd,bkd->bthk", (q8.values * q8.scales).double(),
                              (k8.values * k8.scales).double()) / indexer.head_dim ** 0.5
        weights = indexer.weights_proj(x).double() / indexer.num_heads ** 0.5
        expected = torch.einsum("bth,bthk->btk", weights, logits.relu())
        float_scores = indexer.scores(x, q_compressed, cos, sin, keys)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (got - float_scores).norm() <= 0.05 * float_scores.norm()  # int8's rounding, a few per cent at most


@pytest.mark.parametrize("in_chunks", [False, True])  # True: the prefill's queries scored 3 at a time
def test_decode_over_int8_indexer_keys_equals_prefill_over_them(in_chunks, monkeypatch):
    """Decode (int8 dot products) and chunked prefill (the float product of the int8 values) compute the same
    integers from the same int8 queries and keys (queries from GEMMs of other shapes could round otherwise at a
    near-tie; here they do not), so select the same keys: equal logits, past index_topk; the int8 cache takes a
    quarter of the float keys' bytes, plus a scale per key."""
    from nanoseek.model import attention

    if in_chunks:  # the keys of the chunks' float products are then converted once
        monkeypatch.setattr(attention, "SPARSE_SCORES_ELEMENTS", 3 * 2 * 8 * 40)  # 2 rows, 8 heads, 40 keys
    model = ours_v32()
    ids = _ids(steps=40)
    c = model.config
    decode, prefill = (model.new_cache(num_slots=2, max_len=40, index_dtype=torch.int8) for _ in range(2))
    per_layer = 4 * (c.kv_lora_rank + c.qk_rope_head_dim) + c.index_head_dim + 4
    assert decode.bytes_per_token() == per_layer * c.num_hidden_layers
    with torch.no_grad():
        model(ids[:, :12], cache=decode)
        steps = [model(ids[:, t:t + 1], torch.full((2, 1), t), decode)[:, 0] for t in range(12, 40)]
        model(ids[:, :12], cache=prefill)
        whole = model(ids[:, 12:], torch.arange(12, 40).expand(2, -1), prefill)
    assert (torch.stack(steps, 1) - whole).abs().max() <= TOL


def test_int8_indexer_cache_in_the_engine(v32_checkpoint):
    """LLM(index_cache_dtype="int8"): prefix reuse copies the int8 keys and their scales (greedy tokens as
    without it), MTP speculation drafts over an int8 cache of its own; a wrong dtype is named."""
    from nanoseek import LLM

    shared = [3 + (i * 7) % 120 for i in range(40)]
    batch = [shared + [5 + i] * extra for i, extra in enumerate((3, 9, 20))]
    plain = LLM(v32_checkpoint, max_num_seqs=3, index_cache_dtype="int8")
    assert plain.runner.cache.index.dtype == torch.int8
    expected = [o.outputs[0].token_ids for o in plain.generate(batch, _greedy())]
    cached = LLM(plain.model, max_num_seqs=3, prefix_cache_tokens=256, index_cache_dtype="int8")
    cached.generate(batch[:1], _greedy())
    outputs = cached.generate(batch, _greedy())
    assert [o.outputs[0].token_ids for o in outputs] == expected and outputs[1].num_cached_tokens == 32
    speculative = LLM(v32_checkpoint, max_num_seqs=3, speculative=True, index_cache_dtype="int8")
    assert [o.outputs[0].token_ids for o in speculative.generate(batch, _greedy())] == expected
    with pytest.raises(ValueError, match="index_cache_dtype = 'fp8'"):
        LLM(v32_checkpoint, index_cache_dtype="fp8")
    with pytest.raises(ValueError, match="index_cache_dtype = 'int8': this ModelConfig model has no sparse"):
        LLM(nanoseek.CausalLM(ModelConfig(**tiny_config())), index_cache_dtype="int8")
    with pytest.raises(ValueError, match="index_dtype.*no sparse-attention indexer"):
        nanoseek.CausalLM(ModelConfig(**tiny_config())).new_cache(1, 8, index_dtype=torch.int8)


@pytest.mark.parametrize("index_dtype", [None, torch.int8])
def test_compiled_sparse_decode_compiles_once_for_every_length(index_dtype):
    """The compiled decode step over 40 growing lengths past index_topk, with dynamo told to fail rather than
    fall back to eager at its recompile limit: it equals the eager step at every length."""
    from torch._dynamo.utils import counters

    eager, compiled = ours_v32(), ours_v32().compile_decode()
    ids = _ids(batch=1, steps=56)
    caches = [m.new_cache(num_slots=1, max_len=56, index_dtype=index_dtype) for m in (eager, compiled)]
    counters.clear()
    with torch.no_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for model, cache in zip((eager, compiled), caches, strict=True):
            model(ids[:, :16], cache=cache)
        for t in range(16, 56):
            steps = [m(ids[:, t:t + 1], torch.tensor([[t]]), cache) for m, cache in zip((eager, compiled), caches,
                                                                                          strict=True)]
            assert (steps[0] - steps[1]).abs().max() <= TOL, f"position {t}"
    # a few graphs (3 over fp32 keys, 4 over int8 ones with torch 2.13), not one per length: 40 here
    assert 2 <= counters["stats"]["unique_graphs"] <= 5


def test_cache_context_marks_only_the_causal_mask_causal():
    """Sparse prefill applies a causal mask itself (on the last T keys only), so `causal` must hold exactly when
    every row's new tokens are the last T positions, and never for MTP's shifted keys or rows at other lengths."""
    from nanoseek.model.attention import CacheContext

    cache = nanoseek.CausalLM(DeepSeekV32Config(**v32_kwargs())).new_cache(2, 64)
    cases = {(((5, 6, 7),), 0): True, (((5, 6, 7), (5, 6, 7)), 0): True, (((5, 6, 7), (2, 3, 4)), 0): False,
             (((5, 6, 7),), 1): False, (((7,),), 0): False, (((5, 7, 6),), 0): False}
    for (positions, first_key), causal in cases.items():
        context = CacheContext.build(cache, torch.tensor(positions), None, first_key)
        assert context.causal == causal, (positions, first_key)
        if causal:
            assert torch.equal(context.mask, torch.ones(8, 8, dtype=torch.bool).tril()[None, -3:].expand(
                len(positions), -1, -1))
