"""The inference engine: latent-cache slots, continuous batching, one sampler, MTP speculation."""

from .errors import EngineError
from .llm import LLM, StreamDelta
from .params import SamplingParams
from .sequence import CompletionOutput, RequestOutput

__all__ = ["LLM", "CompletionOutput", "EngineError", "RequestOutput", "SamplingParams", "StreamDelta"]
