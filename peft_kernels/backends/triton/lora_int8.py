"""Fused LoRA linear on an int8 weight-only base (W8A16) in Triton: ``lora_linear_int8_fwd`` / ``_bwd`` of
``backends/reference/lora_int8.py``.

With W_int8: (N, K) int8, w = weight_scale: (N,) fp32 (W_deq = W_int8 ⊙ w[:, None]) and the rest as in ``lora.py``::

    F1 _lora_shrink_kernel          S  = (m ⊙ x) · Aᵀ / (1-p)                        [M, r]  fp32 (unchanged)
    F2 _linear_lora_fwd_kernel      y  = (x · W_int8ᵀ) ⊙ w + b + s·(S · Bᵀ + b_B)     [M, N]  IS_INT8=True
    B1 _lora_bwd_dys_dyb_kernel     dS = s·dY · B,   dB = s·dYᵀ · S                  (unchanged)
    B2 _linear_lora_bwd_dx_kernel   dx = dY · (W_int8 ⊙ w[:, None]) + m ⊙ (dS · A)/(1-p)   IS_INT8=True
    B3 _lora_bwd_da_kernel          dA = dSᵀ · (m ⊙ x) / (1-p)                       (unchanged)

These are the kernels of ``lora.py`` themselves: only F2 and B2 read the weight, and their constexpr ``IS_INT8``
branch (i) converts each int8 tile to the activation dtype in registers (exact: |W| <= 127), so no ``tl.dot`` ever
sees int8, (ii) in F2 multiplies the fp32 base accumulator by w[n] after the K loop and adds the LoRA term after
that (the low-rank term is never scaled), (iii) in B2, where w lies on the reduction axis, dequantizes each W tile
in registers to exactly the reference's ``W_deq`` bits (the reasoning is at the loop). Dropout, S, dS, dA and dB
are computed by the same code, with the same Philox offsets, as for a 16-bit base.

Bytes: the weight is read as int8 (NK instead of 2NK per GEMM) and never written in any other form; nothing beyond
``lora.py``'s traffic plus 4N bytes of scale. Activations fp32 / fp16 / bf16; any M, K, N (masked edges).
Tiles: the 16-bit GEMM lists of ``_configs.py`` (the autotuner keys on the weight's dtype, so int8 and 16-bit
weights are tuned separately). Not yet timed on a GPU.

What the compiler makes of it (triton 3.9 AOT, read from the TTGIR/PTX; no GPU timing behind any of this):
- sm_90, 64/128-row tiles: wgmma stays, but its B operand must sit in shared memory, so the converted bf16 W tile is
  written back to shared memory (``local_alloc`` after ``arith.sitofp``; the int8 -> bf16 conversion is
  ``prmt`` + ``sub.bf16x2``) before each wgmma. Shared memory is still below the 16-bit kernel's at the same config
  (F2 (64, 256, 64), bf16 x, bf16 adapters: 114688 vs 163840 B). Making W the A operand (computing yᵀ tiles,
  "swap AB") would let wgmma read it from registers; a candidate once timed.
- sm_80 and 16-row decode tiles: mma v2 with both operands in registers; int8 -> fp32 -> bf16 conversions.
"""

from __future__ import annotations

import torch

from . import lora


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
    """y = (x·W_int8ᵀ)⊙weight_scale + b + s·((m ⊙ x)·Aᵀ/(1-p)·Bᵀ + b_B); returns (y, [S]) (one adapter).

    Args:
        x: (M, K) fp32/fp16/bf16, any strides.  weight_int8: (N, K) int8, any strides.  weight_scale: (N,) fp32.
        bias: (N,) in x's dtype, or None.  lora_a: [(r, K)].  lora_b: [(N, r)].  lora_b_bias: [(N,) or None].
        scaling, dropout_p: [float].  seeds: int64 (1,) when p > 0.
    Kernels: F1 (S, fp32) then F2 with IS_INT8 (fp32 accumulator, one rounding to x's dtype).
    """
    _check_supported("lora_linear_int8_fwd", x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias,
                     scaling, dropout_p, seeds)  # fmt: skip
    return lora.forward(x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds)


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
    """(dx, [dA], [dB]) of lora_linear_int8_fwd (one adapter); what output_mask excludes is neither computed nor
    returned. dx = dY·W_deq + m ⊙ (dS·A)/(1-p) with W_deq tiles dequantized in registers only.

    Args:
        dy: (M, N) in x's dtype.  saved_s: [S], (M, r) fp32 from the forward.  output_mask: [need dx, need dA and dB].
        The rest as in the forward.
    Kernels: B1 (dS, dB), B2 with IS_INT8 (dx, only when needed), B3 (dA).
    """
    _check_supported("lora_linear_int8_bwd", dy, x, weight_int8, weight_scale, lora_a, lora_b, saved_s, scaling,
                     dropout_p, seeds, output_mask)  # fmt: skip
    return lora.backward(
        dy, x, weight_int8, weight_scale, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, output_mask
    )


def _check_supported(op_name: str, *args) -> None:
    reasons = not_supported_reasons(op_name, *args)
    if reasons:
        raise ValueError(f"Triton {op_name} cannot run this call: " + "; ".join(reasons))


def not_supported_reasons(op_name: str, *args) -> list[str]:
    """Every reason this backend cannot run ``op_name`` on these arguments (empty: it can).

    lora_linear_int8_fwd args: (x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias, scaling,
    dropout_p, seeds).  lora_linear_int8_bwd args: (dy, x, weight_int8, weight_scale, lora_a, lora_b, saved_s,
    scaling, dropout_p, seeds, output_mask). The checks are ``lora.call_reasons`` with the int8 weight format.
    """
    if op_name == "lora_linear_int8_fwd":
        x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias, _scaling, dropout_p, seeds = args
        dy, saved_s = None, []
    elif op_name == "lora_linear_int8_bwd":
        dy, x, weight_int8, weight_scale, lora_a, lora_b, saved_s, _scaling, dropout_p, seeds, _mask = args
        bias, lora_b_bias = None, []
    else:
        return [f"no Triton kernel for {op_name}"]
    return lora.call_reasons(
        dy, x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias, saved_s, dropout_p, seeds
    )
