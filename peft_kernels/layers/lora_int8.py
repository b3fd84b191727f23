"""LoRA over int8 weight-only bases: ``Linear8bitLt`` over bitsandbytes' ``Linear8bitLt`` (CB/SCB, PEFT's class)
and ``LoraInt8Linear`` (a ``Linear8bitLt`` subclass) over peft_kernels' own ``Int8Linear``.

Forward (W8A16, one op): y = x·(W_int8·scale[:, None])ᵀ + b + Σ_a s_a·B_a A_a drop_a(x), with the int8 weight
read as stored (no re-quantization, no dequantized copy kept). This differs from bitsandbytes' LLM.int8
forward (which also quantizes activations) by bnb's own activation-quantization error.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import torch
from torch import nn

from ..formats import bnb_weight_scale, dequantize_bnb_int8, quantize_weight_int8
from ._base import check_adapters_to_merge
from .int8 import Int8Linear
from .lora import LoraLayer


def is_bnb_int8(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Linear8bitLt" and cls.__module__.startswith("bitsandbytes")


class Linear8bitLt(nn.Module, LoraLayer):
    """LoRA over bitsandbytes' int8 ``Linear8bitLt``; PEFT's ``lora.bnb.Linear8bitLt`` names. Adapters stay fp32
    (the base is int8). The weight format is ``formats.py``'s int8 (CB and SCB · 1/127)."""

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
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self._scale_cache: Optional[tuple[tuple, torch.Tensor]] = None
        self.update_layer(
            adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias, inference_mode
        )

    # ---------------------------------------------------------------- the int8 weight as the op reads it
    def int8_weight(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(weight_int8 (N, K) int8, weight_scale (N,) fp32), or None when the base holds float weights."""
        base = self.get_base_layer()
        weight = base.weight
        cb = getattr(weight, "CB", None)
        if cb is None and weight.dtype == torch.int8:
            cb = weight.data
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(base, "state", None), "SCB", None)
        if cb is None or scb is None or cb.dtype != torch.int8:
            return None
        # SCB * (1/127) computed once per SCB tensor version (merge replaces it), not per forward.
        key = (scb.data_ptr(), scb._version, scb.device)
        if self._scale_cache is None or self._scale_cache[0] != key:
            self._scale_cache = (key, bnb_weight_scale(scb))
        return cb, self._scale_cache[1]

    def _dequantized_fp32(self) -> torch.Tensor:
        base = self.get_base_layer()
        weight = base.weight
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else base.state.SCB
        return dequantize_bnb_int8(weight.CB if getattr(weight, "CB", None) is not None else weight.data, scb)

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._branch_forward(x, *args, **kwargs)

    def _lora_forward(self, x: torch.Tensor, active: list[str], args, kwargs) -> torch.Tensor:
        int8 = self.int8_weight()
        base = self.base_layer
        adapters = None
        if int8 is not None and not (args or kwargs or self._base_is_hooked(base)):
            adapters = self._direct_operands(active, nn.Linear)
        if adapters is None:
            return self._eager_forward(x, active, args, kwargs)
        weight_int8, weight_scale = int8
        bias = base.bias.to(x.dtype) if base.bias is not None else None
        return self._fused_linear(x, weight_int8, bias, *adapters, weight_scale=weight_scale)

    def _eager_forward(self, x: torch.Tensor, active: list[str], args, kwargs) -> torch.Tensor:
        """PEFT's int8 formula: each LoRA update is cast to the base output's dtype before it is added."""
        result = self.base_layer(x, *args, **kwargs)
        for adapter in active:
            update = self._eager_lora_update(x, adapter)
            result = result + update.to(result.dtype)
        return result

    # ---------------------------------------------------------------- merge
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]

    def _requantize(self, w_data: torch.Tensor) -> None:
        base = self.get_base_layer()
        import bitsandbytes as bnb

        weight = base.weight
        base.weight = bnb.nn.Int8Params(
            w_data.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights
        ).to(weight.device)
        base.state.reset_grads()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W_int8 ← quantize(dequant(W_int8) + ΔW): warns (rounding) as PEFT does; lora_bias adds b_B unscaled."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            warnings.warn("Merge lora module to 8-bit linear may get different generations due to rounding errors.")
            delta = self.get_delta_weight(adapter)
            w_data = self._dequantized_fp32().to(delta.device) + delta.to(torch.float32)
            if safe_merge and not torch.isfinite(w_data).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            base = self.get_base_layer()
            if self.lora_bias[adapter]:
                # PEFT's int8 merge adds b_B without the scaling (unlike lora.Linear); kept for identical weights.
                bias_data = base.bias.data + self.lora_B[adapter].bias.to(base.bias.dtype)
                if safe_merge and not torch.isfinite(bias_data).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                base.bias.data = bias_data
            self._requantize(w_data)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            warnings.warn("Unmerge lora module to 8-bit linear may get different generations due to rounding errors.")
            delta = self.get_delta_weight(adapter)
            w_data = self._dequantized_fp32().to(delta.device) - delta.to(torch.float32)
            base = self.get_base_layer()
            if self.lora_bias[adapter]:
                base.bias.data = base.bias.data - self.lora_B[adapter].bias.to(base.bias.dtype)
            self._requantize(w_data)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class LoraInt8Linear(Linear8bitLt):
    """LoRA over peft_kernels' own ``Int8Linear`` (same format as bnb's, stored as the op reads it): everything of
    ``Linear8bitLt`` but where the int8 weight lives and how a merge re-quantizes it."""

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.get_base_layer()
        return base.weight, base.weight_scale

    def _dequantized_fp32(self) -> torch.Tensor:
        base = self.get_base_layer()
        return base.weight.to(torch.float32) * base.weight_scale[:, None]

    def _requantize(self, w_data: torch.Tensor) -> None:
        base = self.get_base_layer()
        weight_int8, weight_scale = quantize_weight_int8(w_data)
        base.weight.copy_(weight_int8)
        base.weight_scale.copy_(weight_scale)


def dispatch_bnb_8bit(target: nn.Module, adapter_name: str, **kwargs) -> Optional[nn.Module]:
    """The int8 LoRA layer for ``target``: ``Linear8bitLt`` over a bnb Linear8bitLt, ``LoraInt8Linear`` over an
    Int8Linear; None for anything else."""
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if is_bnb_int8(base):
        return Linear8bitLt(target, adapter_name, **kwargs)
    if isinstance(base, Int8Linear):
        return LoraInt8Linear(target, adapter_name, **kwargs)
    return None
