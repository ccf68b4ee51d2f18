"""Decode-time weight layout: float matrices stored right-multiplied, [in, out], for the CPU engine.

`nn.Linear` keeps W as [out, in] and computes x W^T. At decode a step is one matrix-vector product per matrix,
and on the CPUs measured in docs/benchmarks.md MKL streams x @ W over a contiguous [in, out] matrix at 22.6 GB/s
but x W^T over [out, in] at 15.6 GB/s (576 x 1536 fp32 matrices, 90 of them in turn so that none stays in
cache). The same products, read in the faster layout: the eager engine converts the models it loads itself (never
one handed to it, which a trainer may still be updating); the compiled decode (`LanguageModel.compile_decode`)
turns them back, its row reductions being fastest over [out, in] rows. `weight` stays available as the [out, in]
view, so checkpoint slots and anything reading the weight see nn.Linear's tensor.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..hf_files import TensorSlot, param_slot
from .layers import Linear

# MLA's kv_b_proj is read as a matrix by the absorbed decode path (`attention._absorbed`), not multiplied by
# an activation: it keeps nn.Linear's layout.
KEPT = frozenset({"kv_b_proj"})


class RightMultiplied(nn.Module):
    """y = x @ W_t (+ b) with W_t = W^T [in, out] contiguous; `weight` is W [out, in], a view."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().T.contiguous(), requires_grad=False)
        self.bias = linear.bias

    @property
    def weight(self) -> Tensor:
        return self.weight_t.T

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias

    def checkpoint_slots(self, prefix: str) -> dict[str, TensorSlot]:
        """nn.Linear's names and [out, in] shape, so that checkpoints read and write as before."""
        weight = TensorSlot((self.out_features, self.in_features), lambda: self.weight_t.detach().T,
                            lambda t: self.weight_t.data.copy_(t.T))
        return {f"{prefix}weight": weight, **({} if self.bias is None else {f"{prefix}bias": param_slot(self.bias)})}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def right_multiplied(model: nn.Module) -> nn.Module:
    """Replace, in place, every nn.Linear of `model` by a `RightMultiplied` one, except `KEPT` and a head that
    shares the embedding's weight (a transposed copy would double that matrix's memory)."""
    embedding = getattr(getattr(model, "model", None), "embed_tokens", None)
    shared = None if embedding is None else embedding.weight
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name not in KEPT and child.weight is not shared:
                setattr(module, name, RightMultiplied(child))
    return model


def standard_layout(model: nn.Module) -> nn.Module:
    """Undo `right_multiplied`, in place: every `RightMultiplied` back to a `Linear` over W [out, in] (the
    layout the compiled decode's row reductions stream; `LanguageModel.compile_decode`)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RightMultiplied):
                linear = Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device="meta")  # its parameters are the ones below
                linear.weight = nn.Parameter(child.weight_t.detach().T.contiguous(), requires_grad=False)
                linear.bias = child.bias
                setattr(module, name, linear)
    return model
