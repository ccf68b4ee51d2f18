"""The model families behind one interface (`base.LanguageModel`): DeepSeek-V3 with MLA, DeepSeekMoE and MTP
(`transformer.CausalLM`), and the dense Llama / Qwen2 students (`dense.DenseLM`)."""

from __future__ import annotations

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


__all__ = [
    "CacheContext", "CausalLM", "DecoderLayer", "DenseLM", "LanguageModel", "LatentCache", "MLP", "MTPLayer",
    "ModelOutput", "MoE", "MultiHeadLatentAttention", "RMSNorm", "RouterStats", "add_indexer", "build_model",
]
