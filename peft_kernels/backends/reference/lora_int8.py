"""Reference LoRA linear on an int8 weight-only base (W8A16), in the argument order of the
``lora_linear_int8_fwd`` / ``_bwd`` aliases: ``lora.py``'s functions with ``weight_scale`` given.

Format (``peft_kernels/formats.py``): ``W = (weight_int8 · weight_scale[:, None]).to(x.dtype)``, computed in
``promote_types(x.dtype, float32)`` and rounded once; then exactly ``lora.py``'s forward and backward with that
W. Neither ``weight_int8`` nor ``weight_scale`` receives a gradient.

Memory traffic of this eager reference: it dequantizes W on every call (forward, and again for dx), in blocks of
at most 4 MiB of fp32 feeding slices of the GEMM (``lora._base_linear`` / ``_base_input_grad``), so a large
weight never has a full N×K float temporary; the kernels convert int8 tiles in registers and apply the scale to
the fp32 accumulator instead.
"""

from __future__ import annotations

import torch

from ...formats import BNB_INV_127, bnb_weight_scale, dequantize_bnb_int8, dequantize_int8
from .lora import lora_linear_bwd, lora_linear_fwd

__all__ = ["BNB_INV_127", "bnb_weight_scale", "dequantize_bnb_int8", "dequantize_int8"]


def lora_linear_int8_fwd(x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds):
    """y = x·Wᵀ + b + Σ_a s_a·(x̂_a·A_aᵀ·B_aᵀ + b_Ba), W = weight_int8 · weight_scale[:, None]; returns (y, [S_a] + kept masks).

    Args: x (M, K); weight_int8 (N, K) int8; weight_scale (N,) fp32; the rest as ``lora.lora_linear_fwd``.
    """
    return lora_linear_fwd(x, weight_int8, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds, weight_scale)


def lora_linear_int8_bwd(
    dy, x, weight_int8, weight_scale, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, output_mask
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
    """(dx, [dA_a], [dB_a]) of lora_linear_int8_fwd: ``lora.lora_linear_bwd`` with W dequantized (only for dx)."""
    return lora_linear_bwd(
        dy, x, weight_int8, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, output_mask, weight_scale
    )
