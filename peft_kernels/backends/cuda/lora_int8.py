"""CUDA C++ ``lora_linear_int8_fwd`` for decode shapes (M <= 16): ``_C.lora_linear_int8_fwd_launch``.

W8A16 GEMV with the LoRA epilogue (csrc/lora_int8.cu): y = (x·CBᵀ)⊙scale + b + s·(x·Aᵀ·Bᵀ + b_B), the int8 rows
streamed once and converted in registers. Same signature as ``backends/reference/lora_int8.py``. No backward
kernel: ``lora_linear_int8_bwd`` is declined here and runs on Triton or the reference.
"""

from __future__ import annotations

import torch

from ._launch import raise_if
from .lora import run_small_m, small_m_reasons


def _reasons(x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias, dropout_p) -> list[str]:
    reasons = small_m_reasons(x, weight_int8, bias, lora_a, lora_b, lora_b_bias, dropout_p, weight_dtype=torch.int8)
    if reasons and reasons[0].startswith("tensors are on"):
        return reasons
    if weight_scale.dtype != torch.float32 or weight_scale.stride(0) != 1 or weight_scale.device != x.device:
        reasons.append("weight_scale must be a dense float32 vector on x's device")
    return reasons


def not_supported_reasons(op_name: str, *args) -> list[str]:
    if op_name != "lora_linear_int8_fwd":
        return [f"no CUDA C++ kernel for {op_name}"]
    x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias, _scaling, dropout_p, _seeds = args
    return _reasons(x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias, dropout_p)


def lora_linear_int8_fwd(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    lora_b_bias: list[torch.Tensor | None],
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y = (x·weight_int8ᵀ)⊙weight_scale + b + s·(x·Aᵀ·Bᵀ + b_B); returns (y, [S]) like the reference.

    Conditions: M <= 16, K % 16 == 0, fp16/bf16 x, int8 rows dense and 16-byte aligned, <= 1 adapter, p = 0.
    Raises ValueError listing every unmet condition before launching anything.
    """
    from . import extension

    raise_if(
        "lora_linear_int8_fwd", _reasons(x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias, dropout_p)
    )
    launcher = extension().lora_linear_int8_fwd_launch
    return run_small_m(launcher, x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias, scaling)
