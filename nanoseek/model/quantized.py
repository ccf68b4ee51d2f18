"""Weight-only int8 / int4 quantisation for CPU inference, on PyTorch's own CPU kernels.

* int8: one symmetric scale per output channel, w = q * s with q in [-127, 127]: the format of
  `torch.ops.aten._weight_int8pack_mm` (gpt-fast's int8 weight-only layer).
* int4: asymmetric groups of `group_size` inputs, w = (q - 8) * s + z with q in [0, 15]: the format of
  `torch.ops.aten._weight_int4pack_mm_for_cpu`, packed by `_convert_weight_to_int4pack_for_cpu` (gpt-fast's
  and torchao's int4 weight-only layout, from tinygemm).

Both kernels take bf16 activations and bf16 scales; their fp32 forms are scalar loops, 5-20x slower than an fp32
matmul on the CPUs measured in docs/benchmarks.md, while the bf16 ones beat it at every batch size. A quantised
layer therefore casts its input to bf16 and its output back: a float32 model stays float32 everywhere else (the
residual stream, norms, attention scores, router). The int4 kernel wants the output width a multiple of 16 and
the input width a multiple of the group size (32, 64, 128 or 256); a matrix that is neither is kept int8,
as llama.cpp falls back to another type for rows its blocks do not divide. Compiled for decode
(`LanguageModel.compile_decode`), the int8 products of a few rows run as row reductions that dequantise in
the loop (`int8_rows`), the same products; int4 stays on its kernel, whose packing is blocked per 64 rows.

What is quantised: every `nn.Linear` (attention projections, dense MLPs, shared experts, MTP projections, the
head) and the routed experts. Not quantised: the embedding (a lookup reads one row per token), the router (fp32
in DeepSeek's own code), and MLA's `kv_b_proj`, which decode folds into the query and the output as a matrix
(`attention._absorbed`), where no int kernel applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..flags import DEFAULT_GROUP_SIZE, WEIGHT_FORMATS
from .layers import ROW_DOT_ROWS, apply_keeping_dtype
from .layout import RightMultiplied
from .moe import RoutedExperts, gathered_experts, gathers, route_to_experts

INT4_GROUP_SIZES = (32, 64, 128, 256)
_INT4_OUTPUT_MULTIPLE = 16  # `_convert_weight_to_int4pack_for_cpu` packs rows in blocks of 16
_INT8_INPUT_MULTIPLE = 16  # `_weight_int8pack_mm` reads inputs in blocks of 16
# Modules kept in the compute dtype, by their attribute name (see the module docstring).
UNQUANTISED = frozenset({"kv_b_proj", "weights_proj"})


def int4_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the int4 kernel takes an [out, in] matrix in groups of `group_size` (else it is kept int8)."""
    return out_features % _INT4_OUTPUT_MULTIPLE == 0 and in_features % group_size == 0


def quantized_bytes(out_features: int, in_features: int, form: str, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of one [out, in] matrix in `form`: int8 codes and a bf16 scale per row, or packed int4 codes and a
    bf16 scale and zero per group (int8 where int4 does not fit)."""
    if form == "int4" and int4_fits(out_features, in_features, group_size):
        return out_features * in_features // 2 + 4 * out_features * (in_features // group_size)
    return out_features * (in_features + -in_features % _INT8_INPUT_MULTIPLE) + 2 * out_features


class QuantizedLinear(nn.Module):
    """y = x W^T (+ b) with W in int8 or int4 codes; x in any float dtype, y in x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.matmul(x.reshape(-1, self.in_features).to(torch.bfloat16)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def matmul(self, x: Tensor) -> Tensor:
        """x [M, in] bf16 -> x W^T [M, out] bf16."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtype(self, fn, recurse, ("scales",), torch.bfloat16)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def int8_codes(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Matrices [..., out, in] -> (int8 codes [..., out, in + padding], bf16 scales [..., out]): one symmetric
    scale per output channel, absmax / 127. The kernel reads the input width in steps of 16 (on torch 2.13 it
    crashes on a batch of 4 or more rows otherwise): a matrix of another width gets zero columns up to the next
    multiple, and its input zeros."""
    w = weight.detach().float().contiguous()
    scales = (w.abs().amax(dim=-1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    # the codes are rounded against the bf16 scale the kernel will multiply by, not the exact one
    codes = (w / scales.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
    return F.pad(codes, (0, -w.shape[-1] % _INT8_INPUT_MULTIPLE)), scales


def int8_rows(x: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
    """x [..., in] (any float dtype) times each row of codes [..., out, in + padding] times its scale
    [..., out] -> [..., out] in x's dtype: the kernel's product (bf16 input, fp32 sums, bf16 output), written as
    row reductions that dequantise in the loop, for the compiled decode (`layers.linear` says why: the kernel's
    few-row product, like MKL's, runs on one thread)."""
    rows = codes[..., :x.shape[-1]].float()
    y = (x.to(torch.bfloat16).float()[..., None, :] * rows).sum(-1) * scales.float()
    return y.to(torch.bfloat16).to(x.dtype)


def int8_matmul(x: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
    """x [M, in] bf16 -> x W^T [M, out] bf16 for W = codes * scales (`int8_codes`)."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x.shape[0] <= ROW_DOT_ROWS:
        return int8_rows(x, codes, scales)
    padding = codes.shape[-1] - x.shape[-1]
    return torch._weight_int8pack_mm(F.pad(x, (0, padding)) if padding else x, codes, scales)


class Int8Linear(QuantizedLinear):
    """int8 codes [out, in + padding] and one bf16 scale per output channel (`int8_codes`)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        codes, scales = int8_codes(weight)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    def matmul(self, x: Tensor) -> Tensor:
        return int8_matmul(x, self.codes, self.scales)


class Int4Linear(QuantizedLinear):
    """Packed int4 codes and, per group of `group_size` inputs, a bf16 scale and zero: w = (q - 8) * s + z,
    from the group's min and max (asymmetric, as tinygemm)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, group_size: int = DEFAULT_GROUP_SIZE):
        out_features, in_features = weight.shape
        if not int4_fits(out_features, in_features, group_size):
            raise ValueError(f"int4: a [{out_features}, {in_features}] matrix does not fit groups of {group_size} "
                             f"(needs out % {_INT4_OUTPUT_MULTIPLE} == 0 and in % group_size == 0)")
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        groups = weight.detach().float().contiguous().reshape(out_features, in_features // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
        zero = (low + 8 * scale).to(torch.bfloat16).float()
        codes = ((groups - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15).to(torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.reshape(out_features, in_features), 1)
        self.register_buffer("codes", packed)
        # [in / group, out, 2]: the kernel's scales_and_zeros layout
        self.register_buffer("scales", torch.stack((scale.T, zero.T), dim=-1).contiguous().to(torch.bfloat16))

    def matmul(self, x: Tensor) -> Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.codes, self.group_size, self.scales)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def quantized_linear(weight: Tensor, bias: Tensor | None, form: str,
                     group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedLinear:
    """The [out, in] matrix in `form`; int8 where the int4 kernel does not take its shape."""
    if form == "int4" and int4_fits(weight.shape[0], weight.shape[1], group_size):
        return Int4Linear(weight, bias, group_size)
    return Int8Linear(weight, bias)


class Int8Experts(nn.Module):
    """The routed experts of `RoutedExperts` in int8 (`int8_codes`), stacked: gate-and-up codes [E, 2I, d] and
    down codes [E, d, I] (padded), a scale per row. Eager, each expert used by a batch runs its own rows on the
    kernel (a loop over the experts used, never over tokens); compiled with few tokens, `gathered_experts`."""

    def __init__(self, experts: RoutedExperts):
        super().__init__()
        _, self.inner, self.hidden = experts.w_down.shape  # [E, I, d]
        for name, weight in (("gate_up", experts.w_gate_up), ("down", experts.w_down)):
            codes, scales = int8_codes(weight.transpose(1, 2))  # [E, out, in]
            self.register_buffer(f"{name}_codes", codes)
            self.register_buffer(f"{name}_scales", scales)

    def forward(self, x: Tensor, indices: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """As `RoutedExperts.forward`."""
        experts = self.gate_up_codes.shape[0]
        if gathers(x, indices, experts):
            return gathered_experts(x, indices, weights, experts, self._gate_up_rows, self._down_rows)
        return route_to_experts(x, indices, weights, experts, self._expert_outputs)

    def dequantized(self) -> tuple[Tensor, Tensor]:
        """The float matrices multiplied by, as `RoutedExperts` holds them: ([E, d, 2I], [E, I, d])."""
        gate_up = self.gate_up_codes[..., :self.hidden].float() * self.gate_up_scales.float()[..., None]
        down = self.down_codes[..., :self.inner].float() * self.down_scales.float()[..., None]
        return gate_up.transpose(1, 2), down.transpose(1, 2)

    def _gate_up_rows(self, h: Tensor, indices: Tensor) -> Tensor:
        return int8_rows(h, self.gate_up_codes[indices], self.gate_up_scales[indices])

    def _down_rows(self, h: Tensor, indices: Tensor) -> Tensor:
        return int8_rows(h, self.down_codes[indices], self.down_scales[indices])

    def _expert_outputs(self, rows: Tensor, expert_of_row: Tensor, counts: Tensor) -> Tensor:
        outs, start, dtype = [], 0, rows.dtype
        for expert, count in enumerate(counts.tolist()):
            if count:
                group = rows[start: start + count].to(torch.bfloat16)
                h = int8_matmul(group, self.gate_up_codes[expert], self.gate_up_scales[expert]).to(dtype)
                gate, up = h.chunk(2, dim=-1)
                inner = (F.silu(gate) * up).to(torch.bfloat16)
                outs.append(int8_matmul(inner, self.down_codes[expert], self.down_scales[expert]).to(dtype))
                start += count
        return torch.cat(outs) if outs else rows.new_zeros(0, rows.shape[1])

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtype(self, fn, recurse, ("gate_up_scales", "down_scales"), torch.bfloat16)


class QuantizedExperts(nn.Module):
    """The routed experts of `RoutedExperts` in int4, each expert's gate-and-up and down projections a
    quantised linear map of its own (int8 where the int4 kernel does not take the shape); each expert used by
    a batch runs its own rows (a loop over the experts used, never over tokens)."""

    def __init__(self, experts: RoutedExperts, form: str, group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__()
        w_gate_up, w_down = experts.w_gate_up.detach(), experts.w_down.detach()  # [E, d, 2I], [E, I, d]
        self.gate_up = nn.ModuleList(quantized_linear(w.T, None, form, group_size) for w in w_gate_up)
        self.down = nn.ModuleList(quantized_linear(w.T, None, form, group_size) for w in w_down)

    def forward(self, x: Tensor, indices: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """As `RoutedExperts.forward`."""
        return route_to_experts(x, indices, weights, len(self.gate_up), self._expert_outputs)

    def _expert_outputs(self, rows: Tensor, expert_of_row: Tensor, counts: Tensor) -> Tensor:
        outs, start = [], 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                gate, up = self.gate_up[expert](rows[start: start + count]).chunk(2, dim=-1)
                outs.append(self.down[expert](F.silu(gate) * up))
                start += count
        return torch.cat(outs) if outs else rows.new_zeros(0, rows.shape[1])


def quantize_model(model: nn.Module, form: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Replace, in place, every quantisable matrix of a model on the CPU by its `form` ("int8" or "int4")
    counterpart and free the float weights; returns the model, now for inference only."""
    if form not in WEIGHT_FORMATS:
        raise ValueError(f"quantize = {form!r}: the weight formats are {', '.join(WEIGHT_FORMATS)}")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size = {group_size}: the int4 kernel takes {INT4_GROUP_SIZES}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"quantize = {form!r}: the int8/int4 kernels used are PyTorch's CPU ones and the model "
                         f"is on {device}; on a GPU run bfloat16 (--dtype bfloat16) instead")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            replacement = _quantized(name, child, form, group_size)
            if replacement is not None:
                setattr(module, name, replacement)
    model.requires_grad_(False)
    return model


def quantizes(name: str, module: nn.Module) -> bool:
    """Whether `quantize_model` replaces a child module of this attribute name by a quantised one."""
    matrix = isinstance(module, (nn.Linear, RightMultiplied))  # the engine's decode layout holds the same W
    return isinstance(module, RoutedExperts) or (matrix and name not in UNQUANTISED)


def _quantized(name: str, module: nn.Module, form: str, group_size: int) -> nn.Module | None:
    if not quantizes(name, module):
        return None
    if isinstance(module, RoutedExperts):
        return Int8Experts(module) if form == "int8" else QuantizedExperts(module, form, group_size)
    return quantized_linear(module.weight, module.bias, form, group_size)

