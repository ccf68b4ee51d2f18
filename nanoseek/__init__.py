"""nanoseek: the DeepSeek-V3/R1 system, small and complete."""

from .checkpoint import CheckpointError, load_model
from .config import ConfigError, ModelConfig, preset
from .engine import LLM, CompletionOutput, RequestOutput, SamplingParams
from .model import CausalLM, DenseLM, LanguageModel

__version__ = "0.1.0"

__all__ = [
    "LLM", "CausalLM", "CheckpointError", "CompletionOutput", "ConfigError", "DenseLM", "LanguageModel",
    "ModelConfig", "RequestOutput", "SamplingParams", "load_model", "preset",
]
