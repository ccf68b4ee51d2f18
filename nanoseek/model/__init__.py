"""The model families behind one interface (`base.LanguageModel`): DeepSeek-V3 with MLA, DeepSeekMoE and MTP
(`transformer.CausalLM`), and the dense Llama / Qwen2 students (`dense.DenseLM`)."""

from __future__ import annotations

import torch

from ..config import DenseConfig, ModelConfig
from .attention import CacheContext, LatentCache, MultiHeadLatentAttention
from .base import LanguageModel, ModelOutput
from .dense import DenseLM
from .layers import MLP, RMSNorm
from .moe import MoE, RouterStats
from .transformer import CausalLM, DecoderLayer, MTPLayer, add_indexer


def build_model(config: ModelConfig | DenseConfig, num_mtp_modules: int | None = None) -> LanguageModel:
    """A freshly initialised model of the config's family (MTP modules: the config's count unless given)."""
    if isinstance(config, DenseConfig):
        if num_mtp_modules:
            raise ValueError(f"the dense family has no MTP modules (asked for {num_mtp_modules})")
        return DenseLM(config)
    return CausalLM(config, num_mtp_modules)


def with_config(model: LanguageModel, config: ModelConfig | DenseConfig) -> LanguageModel:
    """`model`'s weights in a model built for `config`, which may change what holds no weight (the RoPE and its
    YaRN scaling, max_position_embeddings) but no tensor's name or shape."""
    with torch.device(model.device):
        rebuilt = build_model(config, len(getattr(model, "mtp", ())) or None).to(model.dtype)
    try:
        rebuilt.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"with_config: the new config changes the weights ({exc})") from exc
    rebuilt.generation_config = dict(model.generation_config)
    return rebuilt


__all__ = [
    "CacheContext", "CausalLM", "DecoderLayer", "DenseLM", "LanguageModel", "LatentCache", "MLP", "MTPLayer",
    "ModelOutput", "MoE", "MultiHeadLatentAttention", "RMSNorm", "RouterStats", "add_indexer", "build_model",
    "with_config",
]
