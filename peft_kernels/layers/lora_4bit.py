"""LoRA over a bitsandbytes 4-bit base (QLoRA): ``Linear4bit``, PEFT 0.21.2's ``lora.bnb.Linear4bit``.

Forward (one op, ``ops.lora_linear_4bit_multi``): y = x_c·W_deqᵀ + b + Σ_a s_a·B_a A_a drop_a(x), with x_c = x in
the base's ``compute_dtype`` (as bnb's ``Linear4bit`` computes) and W_deq decoded from the packed NF4/FP4 codes
in row chunks (CPU) or in registers (Triton): never a dequantized N×K weight. Merge follows PEFT: dequantize,
add ΔW, requantize with bitsandbytes, and warn about the rounding.

bitsandbytes' CPU inference repack (on AVX512-BF16 CPUs, ``Linear4bit``'s first forward without grad in eval
mode rewrites the weight as ``quant_state.packing_format_for_cpu``: nibbles interleaved in 32-row groups, absmax
as bf16 (K/blocksize, N), never nested) is read through ``unpack_cpu_layout``, which rebuilds the standard layout
losslessly (the bf16 absmax are the scales bnb itself then uses); the base is not changed. Either layout's operands
are cached per layer and weight version.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import torch
from torch import nn

from .. import ops
from ..ops.lora_4bit import Quant4bit, dequantize_4bit, quant_operands
from ._base import check_adapters_to_merge
from .lora import LoraLayer

# Rows per interleaved group of bnb's CPU repack (functional._convert_weight_packed_for_cpu's block_n).
_CPU_PACK_ROWS = 32


def is_bnb_4bit(module: nn.Module) -> bool:
    cls = type(module)
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in cls.__mro__)


def unpack_cpu_layout(packed: torch.Tensor, quant_state: Any) -> Quant4bit:
    """The standard ``quantize_4bit`` operands of a weight in bnb's AVX512-BF16 CPU layout.

    That layout: ``packed`` (N, K/2) uint8 where each group of 32 rows g and byte column j holds, in byte i of the
    group (i < 32), row 32g + i//2 … as low nibble the element (32g + i//2, 2j + i%2) and as high nibble the
    element (32g + 16 + i//2, 2j + i%2); scales bf16 (K/blocksize, N). Returns nibbles in row-major order (element
    e is byte e//2's high nibble when e is even) and fp32 scales in block order, not nested.
    """
    n, k = (int(s) for s in quant_state.shape)
    group = packed.view(torch.uint8).reshape(n // _CPU_PACK_ROWS, k // 2, _CPU_PACK_ROWS)
    nibbles = torch.cat([group & 15, group >> 4], dim=-1)  # (groups, K/2, 64): row-in-group-pair, column parity
    codes = nibbles.reshape(n // _CPU_PACK_ROWS, k // 2, _CPU_PACK_ROWS, 2).permute(0, 2, 1, 3).reshape(-1)
    standard = (codes[0::2] << 4) | codes[1::2]
    absmax = quant_state.absmax.t().reshape(-1).to(torch.float32)
    code = quant_state.code.to(torch.float32)
    return Quant4bit(standard, absmax, None, None, None, code, int(quant_state.blocksize), 0, [n, k])


class Linear4bit(nn.Module, LoraLayer):
    """LoRA over a bnb 4-bit base; PEFT's ``lora.bnb.Linear4bit`` names. Adapters take the base's compute dtype."""

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
        self._quant_cache: Optional[tuple[tuple, Quant4bit]] = None
        self.update_layer(
            adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias, inference_mode
        )

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """PEFT's rule for bnb 4-bit bases: adapters take the base's ``compute_dtype`` (none set: no cast)."""
        base = self.get_base_layer()
        if device is not None:
            return super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        compute_dtype = getattr(base, "compute_dtype", None)
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name, None)
            if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in container:
                continue
            if any(p.device.type == "meta" for p in container.parameters()):
                continue
            container[adapter_name] = container[adapter_name].to(base.weight.device, dtype=compute_dtype)

    # ---------------------------------------------------------------- the 4-bit weight as the op reads it
    def quant_weight(self) -> Quant4bit:
        """The base weight's op operands (the standard layout; bnb's CPU repack is unpacked once and cached)."""
        weight = self.get_base_layer().weight
        state = weight.quant_state
        # Cached per weight version (building the operands costs ~70 µs a call, a tenth of a small layer's decode
        # step); a requantized or reloaded weight is a new key.
        key = (
            id(weight),
            weight.data_ptr(),
            weight._version,
            id(state),
            state.absmax.data_ptr(),
            state.absmax._version,
        )
        if self._quant_cache is None or self._quant_cache[0] != key:
            if getattr(state, "packing_format_for_cpu", False):
                self._quant_cache = (key, unpack_cpu_layout(weight.data, state))
            else:
                self._quant_cache = (key, quant_operands(weight, state))
        return self._quant_cache[1]

    def _dequantized(self) -> torch.Tensor:
        """W in the quant state's dtype, bit for bit bnb's ``dequantize_4bit`` (what PEFT's merge starts from)."""
        state = self.get_base_layer().weight.quant_state
        # bnb's CPU repack sets dtype to bf16 and keeps the original in original_dtype.
        return dequantize_4bit(*self.quant_weight(), dtype=getattr(state, "original_dtype", state.dtype))

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._branch_forward(x, *args, **kwargs)

    def _lora_forward(self, x: torch.Tensor, active: list[str], args, kwargs) -> torch.Tensor:
        base = self.base_layer
        adapters = None if args or kwargs or self._base_is_hooked(base) else self._direct_operands(active, nn.Linear)
        if adapters is None:
            return self._eager_forward(x, active, args, kwargs)
        # bnb's Linear4bit computes in compute_dtype (set from the first input when unset) and returns x's dtype.
        compute_dtype = getattr(base, "compute_dtype", None)
        if compute_dtype is None:
            compute_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else None
        x_c = x.to(compute_dtype) if compute_dtype is not None else x
        bias = base.bias.to(x_c.dtype) if base.bias is not None else None
        lora_a, lora_b, lora_b_bias, scales, dropout_p, training = adapters
        y = ops.lora_linear_4bit_multi(
            x_c, self.quant_weight(), bias, lora_a, lora_b, lora_b_bias, scales, dropout_p, training=training
        )
        return y.to(x.dtype)

    def _eager_forward(self, x: torch.Tensor, active: list[str], args, kwargs) -> torch.Tensor:
        """PEFT's 4-bit formula: the base output cloned, each LoRA update cast to its dtype and added."""
        result = self.base_layer(x, *args, **kwargs).clone()
        for adapter in active:
            update = self._eager_lora_update(x, adapter)
            result = result + update.to(result.dtype)
        return result

    # ---------------------------------------------------------------- merge
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]

    def _requantize(self, w_data: torch.Tensor) -> None:
        """Replaces the base weight by bnb's quantization of ``w_data`` with the same format settings (PEFT's way)."""
        import bitsandbytes as bnb

        base = self.get_base_layer()
        weight = base.weight
        settings = {k: v for k, v in weight.__dict__.items() if not k.startswith("_")}
        settings.pop("data", None)
        settings.update(bnb_quantized=False, requires_grad=False, quant_state=None)
        base.weight = bnb.nn.Params4bit(w_data.to("cpu"), **settings).to(weight.device)  # .to quantizes
        self._quant_cache = None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W ← quantize(dequant(W) + ΔW) with bnb's settings of W; warns (rounding) as PEFT does."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            warnings.warn("Merge lora module to 4-bit linear may get different generations due to rounding errors.")
            w_data = self._dequantized() + self.get_delta_weight(adapter)
            if safe_merge and not torch.isfinite(w_data).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            base = self.get_base_layer()
            bias_data = None
            if self.lora_bias[adapter]:
                bias_data = base.bias.data + self.lora_B[adapter].bias
                if safe_merge and not torch.isfinite(bias_data).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            self._requantize(w_data)
            if bias_data is not None:
                base.bias.data = bias_data
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            warnings.warn("Unmerge lora module to 4-bit linear may get different generations due to rounding errors.")
            self._requantize(self._dequantized() - self.get_delta_weight(adapter))
            if self.lora_bias[adapter]:
                self.get_base_layer().bias.data -= self.lora_B[adapter].bias

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def dispatch_bnb_4bit(target: nn.Module, adapter_name: str, **kwargs) -> Optional[nn.Module]:
    """A Linear4bit LoRA layer when ``target`` (or its base layer) is a bitsandbytes Linear4bit, else None."""
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if is_bnb_4bit(base):
        return Linear4bit(target, adapter_name, **kwargs)
    return None
