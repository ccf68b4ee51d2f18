"""The DeepSeek-V3 decoder (V3 paper §2) with its Multi-Token Prediction modules (§2.2); the same decoder,
with DeepSeek-V2's router and no MTP, is DeepSeek-V2 (V2 paper §2; transformers' `modeling_deepseek_v2.py`).

One model serves training (expanded attention, MTP logits, router statistics), RL log-probs and
inference (latent cache, absorbed attention).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from ..config import DeepSeekV32Config, ModelConfig
from ..hf_files import TensorSlot
from .attention import CacheContext, LatentCache, MultiHeadLatentAttention
from .base import LanguageModel, ModelOutput, module_slots, select_positions
from .indexer import DSAMode, IndexerProbe
from .layers import MLP, Linear, RMSNorm
from .moe import MoE, RouterStats
from .rope import RotaryEmbedding


def absorbed_is_cheaper(config: ModelConfig, steps: int, key_len: int) -> bool:
    """Compare MLA's two paths by multiply-adds for `steps` new queries over `key_len` keys per row
    (`inference/model.py`'s `attn_impl` choice).

    Expanding re-projects every key's latent to per-head keys and values, then attends in d_qk + d_v;
    absorbing projects each query and output once but attends in the latent width 2 d_c + d_r. Decoding over a
    long cache favours absorbing; a long prefill from an empty cache favours expanding.
    """
    heads, latent, rope = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
    nope, value = config.qk_nope_head_dim, config.v_head_dim
    expanded = key_len * latent * heads * (nope + value) + steps * key_len * heads * (nope + rope + value)
    absorbed = steps * heads * latent * (nope + value) + steps * key_len * heads * (2 * latent + rope)
    return absorbed <= expanded


class DecoderLayer(nn.Module):
    """Pre-norm block: h += MLA(norm(h)); h += FFN(norm(h)), the FFN dense or MoE."""

    def __init__(self, config: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, cache: CacheContext | None = None,
                absorbed: bool = False, stats: list[RouterStats] | None = None,
                probe: IndexerProbe | None = None) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, absorbed, probe)
        ffn_in = self.post_attention_layernorm(h)
        return h + (self.mlp(ffn_in, stats) if isinstance(self.mlp, MoE) else self.mlp(ffn_in))


class MTPLayer(DecoderLayer):
    """MTP module k (V3 paper eq. 21): h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]) -- embedding first
    (as the released eh_proj weights expect, the reverse of eq. 21's order) -- then a full MoE block; its
    logits are lm_head(shared_head.norm(h^k)) with the shared head."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, moe=True)  # the MTP block is always MoE, as in V3's layer 61
        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = Linear(2 * d, d, bias=False)
        self.shared_head = nn.ModuleDict({"norm": RMSNorm(d, config.rms_norm_eps)})

    def forward(self, embeddings: Tensor, previous: Tensor, cos: Tensor, sin: Tensor,  # type: ignore[override]
                cache: CacheContext | None = None, absorbed: bool = False,
                stats: list[RouterStats] | None = None, probe: IndexerProbe | None = None) -> tuple[Tensor, Tensor]:
        """Embeddings of tokens t_{i+k} and the previous depth's hidden h_i -> (this depth's hidden h^k_i, the
        same after `shared_head.norm`, ready for the shared head)."""
        h = self.eh_proj(torch.cat((self.enorm(embeddings), self.hnorm(previous)), dim=-1))
        h = super().forward(h, cos, sin, cache, absorbed, stats, probe)
        return h, self.shared_head["norm"](h)


class Transformer(nn.Module):
    """Embeddings, decoder layers and the final norm (`model.*` in the checkpoint)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, config.is_moe_layer(i)) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(LanguageModel):
    """DeepSeek-V3 (or, from a `DeepSeekV2Config`, DeepSeek-V2) for causal language modelling: `model(input_ids)`
    returns logits [B, T, vocab].

    `num_mtp_modules` defaults to the config's `num_nextn_predict_layers`; a checkpoint without MTP weights
    is loaded with none.
    """

    def __init__(self, config: ModelConfig, num_mtp_modules: int | None = None):
        super().__init__()
        self.config = config.validate()
        self.model = Transformer(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        depth = config.num_nextn_predict_layers if num_mtp_modules is None else num_mtp_modules
        # MTP module k is `model.layers.{num_hidden_layers + k}` in the checkpoint; its cache index is k.
        self.mtp = nn.ModuleList(MTPLayer(config) for _ in range(depth))
        self.rotary = RotaryEmbedding(config)
        self.generation_config: dict = {}
        self.init_weights()

    # ---- forward ---------------------------------------------------------------------------
    def run(self, input_ids: Tensor, positions: Tensor | None = None, cache: LatentCache | None = None,
            slots: Tensor | None = None, *, absorbed: bool | None = None, mtp: bool = False,
            router_stats: bool = False, logits_index: Tensor | None = None, dsa: DSAMode | None = None) -> ModelOutput:
        """See `LanguageModel.run`. `absorbed` picks MLA's execution path: by default the expanded one without
        a cache (training) and with a cache whichever `absorbed_is_cheaper` finds cheaper for the shape. `dsa`
        (a DeepSeek-V3.2 model in training: "dense" warm-up or "sparse") collects every layer's `IndexerStats`,
        the MTP modules' after the main layers'."""
        if dsa is not None and not self.config.index_cache_dim:
            raise ValueError(f"dsa = {dsa!r}: this model has no sparse-attention indexer (model_type "
                             f"{self.config.MODEL_TYPES[0]}, not deepseek_v32)")
        probe = None if dsa is None else IndexerProbe(dsa)
        batch, steps = input_ids.shape
        if positions is None:
            positions = torch.arange(steps, device=input_ids.device).expand(batch, steps)
        context = None if cache is None else CacheContext.build(cache, positions, slots)
        if absorbed is None:
            absorbed = context is not None and absorbed_is_cheaper(self.config, steps, context.key_len)
        stats: list[RouterStats] | None = [] if router_stats else None
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        runners = self.layer_runners(steps, context is not None and stats is None and probe is None)
        for i, (layer, run_layer) in enumerate(zip(self.model.layers, runners, strict=True)):
            h = run_layer(layer, h, cos, sin, None if context is None else context.layer(i), absorbed, stats, probe)
        hidden, logits = self.final(h, logits_index, context is not None)
        out = ModelOutput(logits, hidden, router_stats=stats or [])
        if mtp:
            out.mtp_logits = self.mtp_logits(input_ids, hidden, positions, stats, probe)
        out.indexer_stats = [] if probe is None else probe.stats
        return out

    def mtp_logits(self, input_ids: Tensor, hidden: Tensor, positions: Tensor,
                   stats: list[RouterStats] | None = None, probe: IndexerProbe | None = None) -> list[Tensor]:
        """Training-time MTP over full sequences (V3 paper eqs. 21-25): depth k predicts token i+k+1 from
        h^{k-1}_i and Emb(t_{i+k}); returns one [B, T-k, V] tensor per depth."""
        logits, previous = [], hidden
        for k, module in enumerate(self.mtp, start=1):
            if previous.shape[1] <= 1:  # too short a sequence for this depth
                logits.append(hidden.new_zeros(hidden.shape[0], 0, self.config.vocab_size))
                continue
            shifted = positions[:, k:]
            cos, sin = self.rotary(shifted, hidden.dtype)
            embeddings = self.model.embed_tokens(input_ids[:, k:])
            previous, normed = module(embeddings, previous[:, :-1], cos, sin, stats=stats, probe=probe)
            logits.append(self.lm_head(normed))
        return logits

    def mtp_step(self, input_ids: Tensor, previous: Tensor, positions: Tensor, cache: LatentCache,
                 slots: Tensor | None = None, logits_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run MTP module 1 over new entries with its own latent cache (speculative drafting, V3 paper §5.4.3).

        Entry i pairs the main model's hidden state h_{i-1} (`previous`, after the final norm) with the token
        at position i (`input_ids`, `positions`); returns (logits for position i + 1, the module's hidden).
        """
        module = self.mtp[0]
        context = CacheContext.build(cache, positions, slots, first_key=1)
        cos, sin = self.rotary(positions, previous.dtype)
        absorbed = absorbed_is_cheaper(self.config, input_ids.shape[1], context.key_len)
        h, normed = module(self.model.embed_tokens(input_ids), previous, cos, sin, context.layer(0), absorbed)
        return self.lm_head(select_positions(normed, logits_index)), h

    # ---- weights ---------------------------------------------------------------------------
    def init_module(self, module: nn.Module, std: float) -> None:
        """The shared rule, plus the router and the stacked experts (zero correction biases, where V3 has them)."""
        if not isinstance(module, MoE):
            return super().init_module(module, std)
        module.gate.weight.normal_(0.0, std)
        if module.gate.e_score_correction_bias is not None:
            module.gate.e_score_correction_bias.zero_()
        module.experts.w_gate_up.normal_(0.0, std)
        module.experts.w_down.normal_(0.0, std)

    def new_cache(self, num_slots: int, max_len: int, mtp: bool = False,
                  index_dtype: torch.dtype | None = None) -> LatentCache:
        """A latent cache for the main layers (or, with `mtp`, for the MTP modules) on the model's device."""
        if index_dtype is not None and not self.config.index_cache_dim:
            raise ValueError(f"index_dtype = {index_dtype}: this model has no sparse-attention indexer "
                             f"(model_type {self.config.MODEL_TYPES[0]}, not deepseek_v32)")
        layers = len(self.mtp) if mtp else self.config.num_hidden_layers
        return LatentCache(self.config, layers, num_slots, max_len, self.device, self.dtype, index_dtype)

    # ---- the checkpoint --------------------------------------------------------------------
    def checkpoint_slots(self) -> dict[str, TensorSlot]:
        """The names of DeepSeek-V3's checkpoints (`README_WEIGHTS.md`): MTP module k at
        `model.layers.{num_hidden_layers + k}`, experts stored one by one. DeepSeek-V2's are the same names less
        the MTP modules and the routers' correction biases (a None buffer has no slot)."""
        slots = module_slots("model.", self.model)
        slots.update(module_slots("lm_head.", self.lm_head))
        embed, head = self.model.embed_tokens.weight, self.lm_head.weight
        for k, module in enumerate(self.mtp):
            prefix = f"model.layers.{self.config.num_hidden_layers + k}."
            slots.update(module_slots(prefix, module))
            # Each MTP layer stores copies of the shared embedding and head (`README_WEIGHTS.md`).
            slots[prefix + "embed_tokens.weight"] = TensorSlot(tuple(embed.shape), lambda: embed.detach().clone(),
                                                               lambda t: None, optional=True)
            slots[prefix + "shared_head.head.weight"] = TensorSlot(
                tuple(head.shape), lambda: head.detach().clone(), lambda t: None, optional=True)
        for name, slot in slots.items():
            slot.keep_fp32 = name.endswith("e_score_correction_bias")  # as the released checkpoints store it
        return slots

    def checkpoint_config(self) -> ModelConfig:
        return replace(self.config, num_nextn_predict_layers=len(self.mtp))


def add_indexer(model: CausalLM, **index: int | None) -> CausalLM:
    """A DeepSeek-V3 `model` made DeepSeek-V3.2: the same weights, and a freshly initialised lightning indexer in
    every layer, the MTP modules' too (V3.2 was continued from V3.1-Terminus so, V3.2-Exp report §2.1.1).
    `index` sizes it (`DeepSeekV32Config.from_v3`)."""
    config = DeepSeekV32Config.from_v3(model.config, **index)
    with torch.device(model.device):
        converted = CausalLM(config, num_mtp_modules=len(model.mtp)).to(model.dtype)
    missing, unexpected = converted.load_state_dict(model.state_dict(), strict=False)
    if unexpected or not all(".indexer." in name for name in missing):
        raise ValueError(f"add_indexer: weights that do not match: {unexpected or missing}")
    converted.generation_config = dict(model.generation_config)
    return converted
