"""LoRA over ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: one layer parameterised by the number of spatial dims.

With W of shape (C_out, C_in/g, *k) (k the d kernel sizes, g = groups) and d ∈ {1, 2, 3}:

    lora_A[a] = ConvNd(C_in, r, k, stride, padding, dilation, bias=False)       weight (r, C_in, *k)
    lora_B[a] = ConvNd(r, C_out, (1,)*d, groups=g, bias=lora_bias)              weight (C_out, r/g, 1, …, 1)

    y = conv(x; W, b) + Σ_a s_a · B_a(A_a(dropout_a(x)))

A sees W's receptive field and B mixes channels per position (r must be divisible by g). For g = 1 the update is
itself one convolution with the base geometry and weight ΔW = s · (B.flatten(1) @ A.flatten(1)).view(W.shape),
which is what ``merge`` adds to W.

Forward route (``CONV_FORWARD_PATH`` states it for ``peft-kernels info``): a pointwise base conv (kernel 1,
stride 1, no padding, g = 1) is the linear map x_pos·Wᵀ at every position, so it runs as one
``ops.lora_linear_multi`` call on x viewed as (N·∏spatial, C_in) rows. Every other geometry runs the reference
path: the base convolution, then A and B as convolutions (PEFT's formula). Lowering those to the fused linear op
over unfolded patches (im2col) was not adopted: unfolding materialises a (N·∏out, C_in·∏k) matrix, ∏k times
the input, which cuDNN's implicit-GEMM convolution never does, so it cannot be expected to be not slower.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import torch
from torch import nn

from ._base import check_adapters_to_merge
from .lora import LoraLayer

CONV_FORWARD_PATH = (
    "lora.Conv1d/Conv2d/Conv3d: pointwise (1x1, stride 1, unpadded, ungrouped) convolutions run the fused LoRA "
    "linear op over (N*spatial, C) rows; every other geometry runs the reference convolution path "
    "(im2col lowering not adopted)"
)

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _is_pointwise_conv(conv: nn.Module) -> bool:
    """A kernel-1, stride-1, unpadded, ungrouped convolution: a linear map over channels at every position."""
    ones = (1,) * len(conv.kernel_size)
    return (
        tuple(conv.kernel_size) == ones
        and tuple(conv.stride) == ones
        # "same" pads (k - 1)·d = 0 positions for a kernel of size 1.
        and (conv.padding in ("valid", "same") or tuple(conv.padding) == (0,) * len(ones))
        and conv.groups == 1
    )


class _ConvNd(nn.Module, LoraLayer):
    """LoRA over a d-dimensional convolution (see the module docstring); subclasses fix d."""

    _conv_cls: type = nn.Conv2d  # the torch layer type this subclass wraps (and builds A and B with)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        init_lora_weights: Union[bool, str] = True,
        use_rslora: bool = False,
        lora_bias: bool = False,
        inference_mode: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        base = self.get_base_layer()
        kernel_dim = self._conv_cls.__name__[-2:-1]  # "1", "2" or "3"
        if base.weight.dim() != int(kernel_dim) + 2:
            raise ValueError(
                f"{type(self).__name__} layer kernel must have {int(kernel_dim) + 2} dimensions, "
                f"not {base.weight.dim()}"
            )
        if base.groups > 1:
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.")
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self._kernel_dim = base.weight.dim()
        self.update_layer(
            adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias, inference_mode
        )

    def _check_new_adapter(self, r: int, lora_bias: bool) -> None:
        base = self.get_base_layer()
        if r % base.groups != 0:
            raise ValueError(
                f"Targeting a {type(base).__name__} with groups={base.groups} and rank {r}. "
                "Currently, support is limited to conv layers where the rank is divisible by groups. "
                "Either choose a different rank or do not target this specific layer."
            )
        if lora_bias and getattr(base, "bias", None) is None:
            warnings.warn(
                f"`lora_bias=True` was passed but the targeted layer of type {type(base).__name__} has no bias. "
                "This means that merging LoRA weights won't be possible."
            )

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        """A (r, C_in, *k), B (C_out, r/g, 1, …, 1)."""
        base = self.get_base_layer()
        ones = (1,) * (self._kernel_dim - 2)
        # PEFT builds A with the base kernel, stride and padding (zeros padding mode, as PEFT). It leaves out
        # the dilation, which for a dilated base makes A's output a different size and the forward fail;
        # passing it changes nothing where PEFT works (dilation is not a parameter, checkpoints are the same).
        self.lora_A[adapter_name] = self._conv_cls(
            self.in_features, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False
        )
        self.lora_B[adapter_name] = self._conv_cls(
            r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias
        )

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW = s · (B.flatten(1) @ A.flatten(1)).view(W.shape); fp32 for 16-bit weights on CPU.

        Only defined for groups = 1: with g > 1, ΔW is a dense (C_out, C_in, *k) kernel that the grouped
        base weight (C_out, C_in/g, *k) cannot hold.
        """
        base = self.get_base_layer()
        if base.groups > 1:
            raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")
        weight_a = self.lora_A[adapter].weight
        weight_b = self.lora_B[adapter].weight
        dtype = weight_a.dtype
        cast_to_fp32 = weight_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if cast_to_fp32:
            weight_a, weight_b = weight_a.float(), weight_b.float()
        # B's kernel is all ones, so composing the two convolutions is a matmul over the rank axis.
        delta = (weight_b.flatten(1) @ weight_a.flatten(1)).view(base.weight.shape) * self.scaling[adapter]
        return delta.to(dtype) if cast_to_fp32 else delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W += ΔW_a for each adapter (and b += s·b_B with lora_bias); ``safe_merge`` checks finiteness first."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base_layer = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            if base_layer.groups > 1:
                raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")
            if self.lora_bias[adapter] and base_layer.bias is None:
                raise RuntimeError(
                    "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias."
                )
            delta = self.get_delta_weight(adapter).to(base_layer.weight.dtype)
            new_bias = None
            if self.lora_bias[adapter]:
                new_bias = base_layer.bias + self.lora_B[adapter].bias * self.scaling[adapter]
            if safe_merge:
                merged = base_layer.weight.data.clone() + delta
                finite = torch.isfinite(merged).all() and (new_bias is None or torch.isfinite(new_bias).all())
                if not finite:
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                base_layer.weight.data = merged
            else:
                base_layer.weight.data += delta
            if new_bias is not None:
                base_layer.bias.data = new_bias.detach().to(base_layer.bias.dtype)
            self.merged_adapters.append(adapter)

    def _pointwise_operands(self, x: torch.Tensor, base_layer: nn.Module, active: list[str], args, kwargs):
        """``_direct_operands`` (1×1 weights viewed (r, C_in) and (C_out, r)) when the op computes exactly what base
        + eager LoRA would: plain pointwise convs, no hooks, a batched input; else None."""
        if args or kwargs or x.dim() != self._kernel_dim:
            return None
        if type(base_layer) is not self._conv_cls or not _is_pointwise_conv(base_layer):
            return None
        if self._base_is_hooked(base_layer):
            return None
        return self._direct_operands(active, self._conv_cls, flatten=True)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._branch_forward(x, *args, **kwargs)

    def _lora_forward(self, x: torch.Tensor, active: list[str], args, kwargs) -> torch.Tensor:
        adapters = self._pointwise_operands(x, self.base_layer, active, args, kwargs)
        if adapters is None:
            return self._eager_forward(x, active, args, kwargs)
        return self._pointwise_forward(x, self.base_layer, adapters)

    def _pointwise_forward(self, x: torch.Tensor, base_layer: nn.Module, adapters: tuple) -> torch.Tensor:
        """Pointwise conv as a GEMM: x (N, C_in, *S) → rows (N·∏S, C_in) → one fused op → (N, C_out, *S).

        Weights enter as views: W (C_out, C_in), A (r, C_in), B (C_out, r); gradients flow back through them.
        """
        n, c_in, *spatial = x.shape
        # A channels-last input needs no copy to become rows; the convolution would then also return channels-last.
        memory_format = _CHANNELS_LAST.get(x.dim())
        channels_last = (
            memory_format is not None and not x.is_contiguous() and x.is_contiguous(memory_format=memory_format)
        )
        rows = x.movedim(1, -1).reshape(-1, c_in)
        # Under autocast the convolution runs in the autocast dtype: _fused_linear casts every operand, as there.
        y = self._fused_linear(rows, base_layer.weight.flatten(1), base_layer.bias, *adapters)
        y = y.view(n, *spatial, -1).movedim(-1, 1)
        return y if channels_last else y.contiguous()

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Conv1d(_ConvNd):
    """LoRA over ``nn.Conv1d`` (weight (C_out, C_in/g, k))."""

    _conv_cls = nn.Conv1d


class Conv2d(_ConvNd):
    """LoRA over ``nn.Conv2d`` (weight (C_out, C_in/g, kh, kw))."""

    _conv_cls = nn.Conv2d


class Conv3d(_ConvNd):
    """LoRA over ``nn.Conv3d`` (weight (C_out, C_in/g, kd, kh, kw))."""

    _conv_cls = nn.Conv3d
