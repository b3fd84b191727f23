"""Reference LoRA linear on an int8 weight-only base: the specification of ``lora_linear_int8_{fwd,bwd}``.

Weight format (W8A16, per-output-row scales)::

    weight_int8   int8    [N, K]    values in [-127, 127] (any strides)
    weight_scale  float32 [N]       one scale per output row n
    W[n, k] = weight_int8[n, k] · weight_scale[n]                  (one fp32 multiply)

bitsandbytes ``Linear8bitLt`` (``has_fp16_weights=False``) stores ``CB`` (int8 [N, K], row-major) and ``SCB``
(fp32 [N], the absmax of each row); its dequantization (``bitsandbytes/_ops.py``, the default kernel of
``int8_vectorwise_dequant``) is ``(CB · SCB[:, None]) · 7.874015718698502e-3`` in fp32, the constant being
1/127 rounded to fp32. The op's format takes ``weight_int8 = CB`` and
``weight_scale = bnb_weight_scale(SCB) = SCB · 7.874015718698502e-3`` (fp32, computed once and cached by the
layer). Because bnb rounds ``CB·SCB`` before multiplying by 1/127 while this format folds 1/127 into the scale,
the two fp32 dequantizations differ by at most one rounding (≈20% of elements differ by 1 ulp on Gaussian
weights; after rounding to fp16 none, to bf16 ≈1e-6 of them). ``dequantize_bnb_int8`` reproduces bnb's own
expression bit for bit, for code (merge) that must match bnb exactly.

Semantics: ``W_deq = (weight_int8 · weight_scale[:, None]).to(x.dtype)``, computed in
``promote_types(x.dtype, float32)`` and rounded once to x's dtype; then exactly ``lora.py``'s forward and
backward with ``weight = W_deq``. Neither ``weight_int8`` nor ``weight_scale`` receives a gradient.

Memory traffic of this eager reference: it materializes ``W_deq`` (an fp32 [N, K] temporary plus the x-dtype
copy, ``4NK + 2NK`` bytes written in bf16) on every call; the kernels convert int8 tiles in registers and
apply the scale to the fp32 accumulator instead.
"""

from __future__ import annotations

import torch

from .lora import _acc_dtype, lora_linear_bwd, lora_linear_fwd

# 1/127 as bitsandbytes writes it (a Python float; torch multiplies an fp32 tensor by it in fp32).
BNB_INV_127 = 7.874015718698502e-3


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
    acc = _acc_dtype(dtype)
    # Scale in place: one N×K temporary, not two (an out-of-place int8 × float multiply casts its int8 input
    # into a temporary of its own first).
    return weight_int8.to(acc).mul_(weight_scale.to(acc)[:, None]).to(dtype)


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
    """y = x·W_deqᵀ + b + Σ_a s_a·(x̂_a·A_aᵀ·B_aᵀ + b_Ba); returns (y, [S_a]).

    Args:
        x: (M, K) fp16/bf16/fp32/fp64, any strides.
        weight_int8: (N, K) int8.  weight_scale: (N,) fp32 (W ≈ weight_int8 · weight_scale[:, None]).
        bias: (N,) in x's dtype, or None.
        lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds: as ``lora.lora_linear_fwd``.
    y has x's dtype; S_a is (M, r_a) in promote_types(A_a.dtype, float32).
    """
    weight = dequantize_int8(weight_int8, weight_scale, x.dtype)
    return lora_linear_fwd(x, weight, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds)


def lora_linear_int8_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    weight_scale: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    saved_s: list[torch.Tensor],
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
    """(dx, [dA_a], [dB_a]) of lora_linear_int8_fwd: ``lora.lora_linear_bwd`` with weight = W_deq.

    Args:
        dy: (M, N).  Everything else as in the forward; ``saved_s`` are the forward's [S_a].
        output_mask: [need dx, need the adapter gradients].
    dx = dY·W_deq + Σ_a m_a ⊙ (dS_a·A_a)/(1-p_a) in x's dtype; W_deq is only built when dx is needed.
    """
    need_dx = output_mask[0]
    # dx is the only consumer of W; without it lora_linear_bwd never reads the weight, so skip the dequant.
    weight = dequantize_int8(weight_int8, weight_scale, x.dtype) if need_dx else weight_int8
    return lora_linear_bwd(dy, x, weight, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, output_mask)
