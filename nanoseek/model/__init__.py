"""The DeepSeek-V3 model: MLA, DeepSeekMoE, MTP."""

from .attention import CacheContext, LatentCache, MultiHeadLatentAttention
from .layers import MLP, RMSNorm
from .moe import MoE, RouterStats
from .transformer import CausalLM, DecoderLayer, ModelOutput, MTPLayer

__all__ = [
    "CacheContext", "CausalLM", "DecoderLayer", "LatentCache", "MLP", "MTPLayer", "ModelOutput", "MoE",
    "MultiHeadLatentAttention", "RMSNorm", "RouterStats",
]
