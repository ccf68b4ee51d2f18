"""The small building blocks: the linear map, RMSNorm and the SwiGLU MLP (dense FFN, shared expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def apply_keeping_dtype(module: nn.Module, fn, recurse: bool, buffers: tuple[str, ...],
                        dtype: torch.dtype = torch.float32) -> nn.Module:
    """nn.Module._apply that moves the named buffers across devices but keeps them in `dtype` whatever dtype the
    model is cast to (RoPE frequencies and the router's correction bias lose too much in bf16; the quantised
    kernels take their scales in bf16 only)."""
    kept = {name: module._buffers.pop(name) for name in buffers}
    nn.Module._apply(module, fn, recurse)
    for name, tensor in kept.items():
        if tensor is not None:
            moved = fn(tensor)  # a meta tensor given storage by to_empty takes fn's result
            tensor = (moved if tensor.is_meta else tensor.to(moved.device)).to(dtype)
        module._buffers[name] = tensor
    return module


# Up to this many rows, a compiled CPU linear map runs as row dot products (`linear`); beyond, as a GEMM.
ROW_DOT_ROWS = 4


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x W^T + b for W [out, in], as nn.Linear.

    Compiled for the CPU (`LanguageModel.compile_decode`) with a few rows, the product is written as what it is
    at decode, one dot product per output row: inductor emits a vectorised, multi-threaded reduction that streams
    W once, contiguously, where an `mm` would run MKL's matrix-vector product, which runs as fast on one thread
    as on two (docs/benchmarks.md: fp32 matrices of the 135M Llama shape on 2 threads, 23-35 GB/s against MKL's
    8-19). The same sums; only the order of the additions differs.
    """
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() <= ROW_DOT_ROWS * x.shape[-1]:
        y = (x[..., None, :] * weight).sum(-1)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear computed by `linear`: the same module, parameters and checkpoint names."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in fp32 and cast back before the weight (transformers'
    `DeepseekV3RMSNorm`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
