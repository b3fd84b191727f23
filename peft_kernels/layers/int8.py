"""Int8Linear: a weight-only int8 linear layer in peft_kernels' own format, and ``quantize_int8``.

Format (the same as bitsandbytes' CB/SCB, stored as the op consumes it)::

    absmax[n]        = max_k |W[n, k]|                                   fp32 [N]
    weight[n, k]     = round(W[n, k] · 127 / absmax[n]), in [-127, 127]  int8 [N, K]   (bnb's CB)
    weight_scale[n]  = absmax[n] · 7.874015718698502e-3  (= absmax/127)  fp32 [N]      (bnb's SCB · 1/127)
    W_deq[n, k]      = weight[n, k] · weight_scale[n]

The forward is ``ops.lora_linear_int8`` with no adapters (W8A16: activations stay in their dtype). Half the
weight bytes of bf16, a quarter of fp32.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .. import ops
from ..formats import BNB_INV_127, quantize_weight_int8

__all__ = ["INV_127", "Int8Linear", "quantize_int8", "quantize_weight_int8"]

INV_127 = BNB_INV_127  # the name this module exported before formats.py owned the constant


class Int8Linear(nn.Module):
    """y = x · (weight · weight_scale[:, None])ᵀ + bias, weight int8 (N, K), weight_scale fp32 (N,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=torch.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        weight_int8, weight_scale = quantize_weight_int8(linear.weight)
        module.weight.copy_(weight_int8)
        module.weight_scale.copy_(weight_scale)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return (self.weight.to(torch.float32) * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return ops.lora_linear_int8_multi(x, self.weight, self.weight_scale, bias, [], [], [], [], [])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: nn.Module, skip_modules: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Replaces every ``nn.Linear`` of ``model`` (in place) by an ``Int8Linear``; returns the model.

    Modules whose name or last name component is in ``skip_modules`` stay as they are (the output head by
    default, as bitsandbytes does). Quantize before ``get_peft_model``, then target the Int8Linear layers.
    """
    skip = set(skip_modules)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and child_name not in skip and full not in skip:
                setattr(module, child_name, Int8Linear.from_linear(child))
    return model
