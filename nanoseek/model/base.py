"""The interface every model family offers, declared once: the engine, the trainers, the server and the
checkpoint code work with any `LanguageModel` (DeepSeek-V3's `CausalLM`, the dense `DenseLM` students).

A family subclasses `LanguageModel` and implements `run` (a forward pass over optional cache slots),
`new_cache`, `checkpoint_slots` (its Hugging Face tensor names) and `checkpoint_config`; the rest (calling
convention, weight init, `save_pretrained`, device and dtype) is shared here.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..config import DenseConfig, ModelConfig
from ..hf_files import TensorSlot, param_slot, write_checkpoint
from .attention import LatentCache
from .indexer import IndexerStats
from .layers import RMSNorm
from .layout import standard_layout
from .moe import RouterStats
from .quantized import DEFAULT_GROUP_SIZE, quantize_model


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V]
    hidden: Tensor  # [B, T, d] after the final norm: what the MTP modules and the engine consume
    mtp_logits: list[Tensor] = field(default_factory=list)  # depth k: [B, T - k, V], predicting token t+k+1
    router_stats: list[RouterStats] = field(default_factory=list)  # one per MoE layer, main model first
    indexer_stats: list[IndexerStats] = field(default_factory=list)  # V3.2 in training: one per attention layer


def select_positions(hidden: Tensor, index: Tensor | None) -> Tensor:
    """hidden [B, T, d] at index [B, k] -> [B, k, d]; all of it when index is None."""
    return hidden if index is None else hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))


# Decode steps: a speculative step runs two tokens per row.
DECODE_STEPS = 2


def _compiled_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile of a copy of `fn` with a code object of its own: dynamo keeps compiled programs, and its
    limit on recompilations, per code object, so that each model and each kind of layer has its own."""
    return torch.compile(types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__), dynamic=True)


def _run_layer(layer: nn.Module, *args: Any) -> Tensor:
    return layer(*args)


def _run_final(norm: nn.Module, head: nn.Module, h: Tensor, logits_index: Tensor | None) -> tuple[Tensor, Tensor]:
    hidden = norm(h)
    return hidden, head(select_positions(hidden, logits_index))


def module_slots(prefix: str, module: nn.Module) -> dict[str, TensorSlot]:
    """Checkpoint slots of a module's parameters and persistent buffers under `prefix`; a submodule with a
    `checkpoint_slots(prefix)` method (stacked experts stored per expert) supplies its own."""
    slots: dict[str, TensorSlot] = {}
    custom = []
    for name, sub in module.named_modules():
        if hasattr(sub, "checkpoint_slots") and (name or not isinstance(sub, LanguageModel)):
            slots.update(sub.checkpoint_slots(f"{prefix}{name}." if name else prefix))
            custom.append(f"{name}." if name else "")
    for name, tensor in module.state_dict(keep_vars=True).items():
        if not any(name.startswith(c) for c in custom):
            slots[prefix + name] = param_slot(tensor)
    return slots


class LanguageModel(nn.Module):
    """A causal LM: `model(input_ids)` -> logits [B, T, V]; `model.run(...)` -> ModelOutput.

    Attributes every family sets: `config` (its `ModelConfig` or `DenseConfig`), `model` (embeddings, layers,
    final norm), `lm_head`, `mtp` (the MTP modules, empty when the family has none) and `generation_config`
    (the dict written as generation_config.json).
    """

    config: ModelConfig | DenseConfig
    lm_head: nn.Module  # nn.Linear, or a QuantizedLinear after `quantize`
    mtp: nn.ModuleList
    generation_config: dict[str, Any]

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, cache: LatentCache | None = None,
                slots: Tensor | None = None, *, mtp: bool = False, router_stats: bool = False,
                logits_index: Tensor | None = None, **options: Any) -> Tensor | ModelOutput:
        """Logits [B, T, V]; the whole ModelOutput when `mtp` or `router_stats` asks for more (see `run`)."""
        out = self.run(input_ids, positions, cache, slots, mtp=mtp, router_stats=router_stats,
                       logits_index=logits_index, **options)
        return out if (mtp or router_stats) else out.logits

    def run(self, input_ids: Tensor, positions: Tensor | None = None, cache: LatentCache | None = None,
            slots: Tensor | None = None, *, mtp: bool = False, router_stats: bool = False,
            logits_index: Tensor | None = None, **options: Any) -> ModelOutput:
        """One forward pass. positions [B, T] default to 0..T-1. With a `cache`, each row's new keys are written
        at its positions in its slot (`slots[b]`, default b) and attention reads that slot up to the row's own
        position. `logits_index` [B, k] limits the logits to k positions per row. `mtp` adds the MTP logits,
        `router_stats` each MoE layer's routing; families without them return empty lists."""
        raise NotImplementedError

    def new_cache(self, num_slots: int, max_len: int, mtp: bool = False,
                  index_dtype: torch.dtype | None = None) -> LatentCache:
        """A cache of `num_slots` sequences of up to `max_len` tokens on the model's device (with `mtp`, for
        the MTP modules' speculative drafting; `index_dtype` torch.int8 keeps a V3.2 model's indexer keys in
        int8)."""
        raise NotImplementedError

    def mtp_step(self, input_ids: Tensor, previous: Tensor, positions: Tensor, cache: LatentCache,
                 slots: Tensor | None = None, logits_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Draft with MTP module 1 over a cache (speculative decoding); only families with MTP modules."""
        raise ValueError(f"{type(self).__name__} has no MTP module to draft with")

    # ---- the checkpoint ----------------------------------------------------------------------------
    def checkpoint_slots(self) -> dict[str, TensorSlot]:
        """Every tensor of the family's Hugging Face checkpoint, keyed by its name there."""
        raise NotImplementedError

    def checkpoint_config(self) -> ModelConfig | DenseConfig:
        """The config that describes these weights in config.json."""
        return self.config

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        max_shard_bytes: int | None = None) -> None:
        """Write an HF checkpoint directory that transformers loads (DeepseekV3ForCausalLM, or the dense
        family's LlamaForCausalLM / Qwen2ForCausalLM)."""
        if self.weight_format is not None:
            raise ValueError(f"save_pretrained: this model's weights are {self.weight_format}-quantised for "
                             "inference; save the checkpoint it was loaded from (or export a quantised GGUF file "
                             "with `nanoseek export-gguf --type q8_0|q4_0`)")
        config = self.checkpoint_config()
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                      **self.generation_config}
        write_checkpoint(path, self.checkpoint_slots(), config.to_dict(), generation, dtype or self.dtype,
                         max_shard_bytes)

    # ---- compiled decode ---------------------------------------------------------------------------
    _decode_programs: list[Callable[..., Any]] | None = None  # per layer, then the final one; `compile_decode`

    def compile_decode(self) -> LanguageModel:
        """Compile the decode steps (up to `DECODE_STEPS` tokens per row over a cache) for the CPU with
        torch.compile, in place.

        Regional compilation: one compiled program per kind of layer, shared by every layer of that kind (the
        layer's weights and its cache are the program's inputs, never constants), and one for the final norm
        and the head; dynamic shapes, so that a new batch size or cache length seldom recompiles. A layer then
        runs as a few fused loops instead of tens of eager operations, and its few-row products as row
        reductions (`layers.linear`, `moe.gathered_experts`). Longer forwards (prefill) and training stay
        eager. The same function is computed; each new shape pays for its compilation (tens of seconds the
        first time, less once inductor's on-disk cache holds it). Quantising afterwards drops the programs.
        """
        if self.weight_format not in (None, "int8"):
            raise ValueError(f"compile_decode: the {self.weight_format} weights run eager on their kernel; compile "
                             "a float or int8 model")
        standard_layout(self)  # the row reductions read nn.Linear's [out, in] rows
        for module in self.modules():
            if hasattr(module, "reduce_over_contiguous"):
                module.reduce_over_contiguous()
        programs: dict[tuple[type, ...], Callable[..., Any]] = {}  # a layer's kind: the types of its modules
        self._decode_programs = []
        for layer in self.model.layers:
            kind = tuple(type(m) for m in layer.modules())
            if kind not in programs:
                programs[kind] = _compiled_copy(_run_layer)
            self._decode_programs.append(programs[kind])
        self._decode_programs.append(_compiled_copy(_run_final))
        return self

    def _decoding(self, steps: int, cached: bool) -> bool:
        return self._decode_programs is not None and cached and steps <= DECODE_STEPS and self.device.type == "cpu"

    def layer_runners(self, steps: int, cached: bool) -> list[Callable[..., Tensor]]:
        """How `run` calls each layer, `runner(layer, *args)`: compiled for decode steps after `compile_decode`."""
        if self._decoding(steps, cached):
            return self._decode_programs[:-1]
        return [_run_layer] * len(self.model.layers)

    def final(self, h: Tensor, logits_index: Tensor | None, cached: bool) -> tuple[Tensor, Tensor]:
        """(hidden after the final norm, logits at `logits_index`), compiled for decode steps."""
        run = self._decode_programs[-1] if self._decoding(h.shape[1], cached) else _run_final
        return run(self.model.norm, self.lm_head, h, logits_index)

    # ---- weights -----------------------------------------------------------------------------------
    weight_format: str | None = None  # "int8" or "int4" once `quantize` ran

    def tie_weights(self) -> None:
        """Share the weights the config ties (the dense family's tied head); again after `to_empty`, which gives
        every parameter storage of its own."""

    def quantize(self, form: str, group_size: int = DEFAULT_GROUP_SIZE) -> LanguageModel:
        """Weight-only int8 or int4 matrices for CPU inference (`quantized.quantize_model`), in place; the
        model can no longer be trained or saved. Quantising again in the same format changes nothing."""
        if self.weight_format == form:
            return self
        if self.weight_format is not None:
            raise ValueError(f"quantize = {form!r}: this model's weights are {self.weight_format} already")
        quantize_model(self, form, group_size)
        self.weight_format = form
        self._decode_programs = None  # compiled for the layers just replaced
        return self

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

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype
