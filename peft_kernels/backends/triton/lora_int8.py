"""Fused LoRA linear on an int8 weight-only base (W8A16) in Triton: ``lora_linear_int8_fwd`` / ``_bwd`` of
``backends/reference/lora_int8.py``.

With W_int8: (N, K) int8, w = weight_scale: (N,) fp32 (W_deq = W_int8 ⊙ w[:, None]) and the rest as in ``lora.py``::

    F1 _lora_shrink_kernel          S  = (m ⊙ x) · Aᵀ / (1-p)                        [M, r]  fp32 (unchanged)
    F2 _linear_lora_fwd_kernel      y  = (x · W_int8ᵀ) ⊙ w + b + s·(S · Bᵀ + b_B)     [M, N]  IS_INT8=True
    B1 _lora_bwd_dys_dyb_kernel     dS = s·dY · B,   dB = s·dYᵀ · S                  (unchanged)
    B2 _linear_lora_bwd_dx_kernel   dx = dY · (W_int8 ⊙ w[:, None]) + m ⊙ (dS · A)/(1-p)   IS_INT8=True
    B3 _lora_bwd_da_kernel          dA = dSᵀ · (m ⊙ x) / (1-p)                       (unchanged)

These are the launchers of ``lora.py`` and the kernels of ``lora_kernels.py`` themselves (``lora_linear_fwd`` /
``_bwd`` with ``weight_scale``): only F2 and B2 read the weight, and their constexpr ``IS_INT8`` branch (i) converts each int8 tile to the activation dtype in registers (exact: |W| <= 127), so no ``tl.dot`` ever
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

from . import lora


def _as_lora_args(x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds):
    return x, weight_int8, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds, weight_scale


def _as_lora_bwd_args(dy, x, weight_int8, weight_scale, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, mask):
    return dy, x, weight_int8, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, mask, weight_scale


def lora_linear_int8_fwd(*args):
    """``lora.lora_linear_fwd`` in the alias's argument order: (x, weight_int8, weight_scale, bias, lora_a, lora_b,
    lora_b_bias, scaling, dropout_p, seeds) -> (y, [S]); x (M, K) fp32/fp16/bf16, weight_int8 (N, K) int8 (any
    strides), weight_scale (N,) fp32. Kernels: F1 then F2 with IS_INT8."""
    return lora.lora_linear_fwd(*_as_lora_args(*args))


def lora_linear_int8_bwd(*args):
    """``lora.lora_linear_bwd`` in the alias's argument order: (dy, x, weight_int8, weight_scale, lora_a, lora_b,
    saved_s, scaling, dropout_p, seeds, output_mask) -> (dx, [dA], [dB]). Kernels: B1, B2 with IS_INT8, B3."""
    return lora.lora_linear_bwd(*_as_lora_bwd_args(*args))


def not_supported_reasons(op_name: str, *args) -> list[str]:
    """``lora.not_supported_reasons`` for a call of the int8 aliases in their argument order."""
    if op_name == "lora_linear_int8_fwd":
        return lora.not_supported_reasons("lora_linear_fwd", *_as_lora_args(*args))
    if op_name == "lora_linear_int8_bwd":
        return lora.not_supported_reasons("lora_linear_bwd", *_as_lora_bwd_args(*args))
    return [f"no Triton kernel for {op_name}"]
