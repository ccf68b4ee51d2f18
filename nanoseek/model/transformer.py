"""The DeepSeek-V3 decoder (V3 paper §2) with its Multi-Token Prediction modules (§2.2).

One model serves training (expanded attention, MTP logits, router statistics), RL log-probs and
inference (latent cache, absorbed attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .attention import CacheContext, LatentCache, MultiHeadLatentAttention
from .layers import MLP, RMSNorm
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


def _select(hidden: Tensor, index: Tensor | None) -> Tensor:
    """hidden [B, T, d] at index [B, k] -> [B, k, d]; all of it when index is None."""
    return hidden if index is None else hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V]
    hidden: Tensor  # [B, T, d] after the final norm: what the MTP modules and the engine consume
    mtp_logits: list[Tensor] = field(default_factory=list)  # depth k: [B, T - k, V], predicting token t+k+1
    router_stats: list[RouterStats] = field(default_factory=list)  # one per MoE layer, main model first


class DecoderLayer(nn.Module):
    """Pre-norm block: h += MLA(norm(h)); h += FFN(norm(h)), the FFN dense or MoE."""

    def __init__(self, config: ModelConfig, layer_idx: int, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, cache: CacheContext | None = None,
                absorbed: bool = False, stats: list[RouterStats] | None = None) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, absorbed)
        ffn_in = self.post_attention_layernorm(h)
        return h + (self.mlp(ffn_in, stats) if isinstance(self.mlp, MoE) else self.mlp(ffn_in))


class MTPLayer(DecoderLayer):
    """MTP module k (V3 paper eq. 21): h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]) -- embedding first
    (as the released eh_proj weights expect, the reverse of eq. 21's order) -- then a full MoE block; its
    logits are lm_head(shared_head.norm(h^k)) with the shared head."""

    def __init__(self, config: ModelConfig, depth_idx: int):
        super().__init__(config, depth_idx, moe=True)  # the MTP block is always MoE, as in V3's layer 61
        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.shared_head = nn.ModuleDict({"norm": RMSNorm(d, config.rms_norm_eps)})

    def forward(self, embeddings: Tensor, previous: Tensor, cos: Tensor, sin: Tensor,  # type: ignore[override]
                cache: CacheContext | None = None, absorbed: bool = False,
                stats: list[RouterStats] | None = None) -> tuple[Tensor, Tensor]:
        """Embeddings of tokens t_{i+k} and the previous depth's hidden h_i -> (this depth's hidden h^k_i, the
        same after `shared_head.norm`, ready for the shared head)."""
        h = self.eh_proj(torch.cat((self.enorm(embeddings), self.hnorm(previous)), dim=-1))
        h = super().forward(h, cos, sin, cache, absorbed, stats)
        return h, self.shared_head["norm"](h)


class Transformer(nn.Module):
    """Embeddings, decoder layers and the final norm (`model.*` in the checkpoint)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, config.is_moe_layer(i)) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LanguageModel(nn.Module):
    """What every model family shares: an HF checkpoint writer and the device and dtype of its weights."""

    lm_head: nn.Linear

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for every matrix, zero biases, unit norms: module by module, in order
        (the order of the random draws is what makes a seed give the same model)."""
        for module in self.modules():
            self.init_module(module, self.config.initializer_range)

    def init_module(self, module: nn.Module, std: float) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)

    def save_pretrained(self, path, dtype: torch.dtype | None = None, max_shard_bytes: int | None = None) -> None:
        """Write an HF checkpoint directory that transformers loads (DeepseekV3ForCausalLM, or the dense
        family's LlamaForCausalLM / Qwen2ForCausalLM)."""
        from ..checkpoint import save_model

        save_model(self, path, dtype=dtype, max_shard_bytes=max_shard_bytes)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype


class CausalLM(LanguageModel):
    """DeepSeek-V3 for causal language modelling: `model(input_ids)` returns logits [B, T, vocab].

    `num_mtp_modules` defaults to the config's `num_nextn_predict_layers`; a checkpoint without MTP weights
    is loaded with none.
    """

    def __init__(self, config: ModelConfig, num_mtp_modules: int | None = None):
        super().__init__()
        self.config = config.validate()
        self.model = Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        depth = config.num_nextn_predict_layers if num_mtp_modules is None else num_mtp_modules
        # MTP module k is `model.layers.{num_hidden_layers + k}` in the checkpoint; its cache index is k.
        self.mtp = nn.ModuleList(MTPLayer(config, k) for k in range(depth))
        self.rotary = RotaryEmbedding(config)
        self.generation_config: dict = {}
        self.init_weights()

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, positions: Tensor | None = None, cache: LatentCache | None = None,
                slots: Tensor | None = None, *, absorbed: bool | None = None, mtp: bool = False,
                router_stats: bool = False, logits_index: Tensor | None = None) -> Tensor | ModelOutput:
        """Logits [B, T, V]; a ModelOutput instead when `mtp` or `router_stats` asks for more.

        positions [B, T] default to 0..T-1. With a `cache`, each row's new latents are written at its
        positions in its slot (`slots[b]`, default b) and attention reads that slot's keys up to the row's
        own position. `absorbed` picks MLA's execution path; by default the expanded one without a cache
        (training) and with a cache whichever `absorbed_is_cheaper` finds cheaper for the shape.
        `logits_index` [B, k] limits the logits to k positions of each row (the last prompt token in
        prefill, say): logits are then [B, k, V].
        """
        out = self.run(input_ids, positions, cache, slots, absorbed=absorbed, mtp=mtp, router_stats=router_stats,
                       logits_index=logits_index)
        return out if (mtp or router_stats) else out.logits

    def run(self, input_ids: Tensor, positions: Tensor | None = None, cache: LatentCache | None = None,
            slots: Tensor | None = None, *, absorbed: bool | None = None, mtp: bool = False,
            router_stats: bool = False, logits_index: Tensor | None = None) -> ModelOutput:
        batch, steps = input_ids.shape
        if positions is None:
            positions = torch.arange(steps, device=input_ids.device).expand(batch, steps)
        context = None if cache is None else CacheContext.build(cache, positions, slots)
        if absorbed is None:
            absorbed = context is not None and absorbed_is_cheaper(self.config, steps, context.key_len)
        stats: list[RouterStats] | None = [] if router_stats else None
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, context, absorbed, stats)
        hidden = self.model.norm(h)
        out = ModelOutput(self.lm_head(_select(hidden, logits_index)), hidden, router_stats=stats or [])
        if mtp:
            out.mtp_logits = self.mtp_logits(input_ids, hidden, positions, stats)
        return out

    def mtp_logits(self, input_ids: Tensor, hidden: Tensor, positions: Tensor,
                   stats: list[RouterStats] | None = None) -> list[Tensor]:
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
            previous, normed = module(embeddings, previous[:, :-1], cos, sin, stats=stats)
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
        h, normed = module(self.model.embed_tokens(input_ids), previous, cos, sin, context, absorbed)
        return self.lm_head(_select(normed, logits_index)), h

    # ---- weights ---------------------------------------------------------------------------
    def init_module(self, module: nn.Module, std: float) -> None:
        """The shared rule, plus the router and the stacked experts (zero correction biases)."""
        if not isinstance(module, MoE):
            return super().init_module(module, std)
        module.gate.weight.normal_(0.0, std)
        module.gate.e_score_correction_bias.zero_()
        module.experts.w_gate_up.normal_(0.0, std)
        module.experts.w_down.normal_(0.0, std)

    def new_cache(self, num_slots: int, max_len: int, mtp: bool = False) -> LatentCache:
        """A latent cache for the main layers (or, with `mtp`, for the MTP modules) on the model's device."""
        layers = len(self.mtp) if mtp else self.config.num_hidden_layers
        return LatentCache(self.config, layers, num_slots, max_len, self.device, self.dtype)
