"""Base-weight formats of the LoRA-linear op: the one module that owns how a quantized base weight is laid out.

The op ``lora_linear_fwd`` / ``_bwd`` takes the base weight as ``weight`` plus an optional ``weight_scale``;
the pair names the format, and every backend reads it the same way:

    format        weight                       weight_scale          W (what the op multiplies by)
    dense         float (N, K), any strides    None                  weight
    int8 (W8A16)  int8 (N, K), any strides     float32 (N,)          weight[n, k] · weight_scale[n]

int8 is bitsandbytes' ``Linear8bitLt`` layout (``has_fp16_weights=False``): ``CB`` int8 [N, K] row-major, values
in [-127, 127], and ``SCB`` float32 [N], the absmax of each row. bnb dequantizes ``(CB · SCB[:, None]) · (1/127)``
in fp32 with 1/127 rounded to fp32 (``BNB_INV_127``); the op folds the constant into the scale once
(``weight_scale = bnb_weight_scale(SCB)``), so the two fp32 dequantizations differ by at most one rounding
(≈20% of elements by 1 ulp on Gaussian weights; none after rounding to fp16, ≈1e-6 of them in bf16).
``dequantize_bnb_int8`` reproduces bnb's own expression bit for bit, for code (merge) that must match bnb.

How the 4-bit format (bitsandbytes' NF4/FP4 ``Linear4bit``) plugged in: its operands (packed codes, blockwise
absmax and its nested quantization, the 16-entry code table, blocksize, shape) do not fit one ``weight_scale``,
so it is its own op pair, ``lora_linear_4bit_fwd`` / ``_bwd`` (``ops/lora_4bit.py``, schema in
``backends/__init__.py``), which shares the LoRA halves with this op: ``add_lora_fwd`` / ``add_lora_bwd`` in the
reference and ``backward(..., dx_launch=)`` in the Triton launchers. A format that is "integer codes times a
per-row scale" fits ``weight_scale`` instead: (1) a ``dequantize_*`` here, the spec; (2) ``check_weight`` learns
the format; (3) the reference dequantizes through it; (4) kernels take it when they can and their capability
check declines it otherwise. Layers, the autograd Function and the dispatcher do not change.
"""

from __future__ import annotations

import torch

# 1/127 as bitsandbytes writes it (a Python float; torch multiplies an fp32 tensor by it in fp32).
BNB_INV_127 = 7.874015718698502e-3


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_int8 (N, K) int8, weight_scale (N,) fp32) of a float weight (N, K), rows scaled by their absmax:
    weight_int8 = round(127·W/absmax_n) (bnb's ``int8_vectorwise_quant``), weight_scale = absmax_n · (1/127)."""
    w = weight.detach().to(torch.float32)
    absmax = w.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # an all-zero row stays zero
    weight_int8 = torch.round(w * (127.0 / safe)[:, None]).clamp_(-127, 127).to(torch.int8)
    return weight_int8, absmax * BNB_INV_127


def bnb_weight_scale(scb: torch.Tensor) -> torch.Tensor:
    """weight_scale[n] = SCB[n] · 7.874015718698502e-3 in fp32.  scb: (N,) fp32 → (N,) fp32."""
    return scb.to(torch.float32) * BNB_INV_127


def dequantize_bnb_int8(cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """W = (CB · SCB[:, None]) · 7.874015718698502e-3 in fp32, bit-identical to bnb's int8_vectorwise_dequant.

    Args: cb: (N, K) int8.  scb: (N,) fp32.  Returns (N, K) fp32.
    """
    return cb * scb.view(-1, 1) * BNB_INV_127


def dequantize_int8(weight_int8: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W_deq = (weight_int8 · weight_scale[:, None]) in promote_types(dtype, float32), rounded once to ``dtype``.

    Args: weight_int8: (N, K) int8.  weight_scale: (N,) fp32.  Returns (N, K) in ``dtype``.
    Integers in [-127, 127] are exact in every float dtype, so the only roundings are the product and the cast.
    """
    acc = torch.promote_types(dtype, torch.float32)
    # Scale in place: one N×K temporary, not two (an out-of-place int8 × float multiply casts its int8 input
    # into a temporary of its own first).
    return weight_int8.to(acc).mul_(weight_scale.to(acc)[:, None]).to(dtype)


def dequantize(weight: torch.Tensor, weight_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """W of any format above, in ``dtype`` (a dense weight is returned as it is)."""
    if weight_scale is None:
        return weight
    return dequantize_int8(weight, weight_scale, dtype)


def weight_format_error(weight: torch.Tensor, weight_scale: torch.Tensor | None) -> str | None:
    """Why (weight, weight_scale) is no format of the table above (None: it is one)."""
    if weight.dim() != 2:
        return f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}"
    if weight_scale is None:
        return None if weight.is_floating_point() else f"weight is {weight.dtype} without a weight_scale"
    if weight.dtype != torch.int8:
        return f"weight_int8 must be int8, got {weight.dtype}"
    if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (weight.shape[0],):
        return (
            f"weight_scale must be fp32 of shape ({weight.shape[0]},), got {weight_scale.dtype} "
            f"{tuple(weight_scale.shape)} (for bitsandbytes: SCB * 7.874015718698502e-3)"
        )
    return None
