"""Fused LoRA linear in Triton: ``lora_linear_fwd`` / ``lora_linear_bwd`` of ``backends/reference/lora.py``.

One active adapter per call (several go to the reference through ``not_supported_reasons``). With x: (M, K),
W: (N, K), A: (r, K), B: (N, r), s = scaling, p = dropout probability, m = the keep mask of ``dropout.py``::

    F1 _lora_shrink_kernel          S  = (m ⊙ x) · Aᵀ / (1-p)                  [M, r]  fp32, saved for backward
    F2 _linear_lora_fwd_kernel      y  = x · Wᵀ + b + s·(S · Bᵀ + b_B)        [M, N]  one fp32 accumulator, one rounding
    B1 _lora_bwd_dys_dyb_kernel     dS = s·dY · B,   dB = s·dYᵀ · S            [M, r], [N, r]  from one read of dY
    B2 _linear_lora_bwd_dx_kernel   dx = dY · W + m ⊙ (dS · A) / (1-p)         [M, K]  LoRA term masked on its own
    B3 _lora_bwd_da_kernel          dA = dSᵀ · (m ⊙ x) / (1-p)                 [r, K]

Bytes beyond the base GEMMs (docs/KERNELS.md §9): forward reads x once more (F1) and writes S (4Mr); backward reads dY
once more (B1) and x once more (B3). No M×N or M×K temporary exists; the mask is regenerated, never stored.

Numerics (docs/KERNELS.md §2): every dot accumulates in fp32. The base dots run on x's dtype. A LoRA dot whose operands
differ in dtype (fp32 S or dS against a 16-bit operand, or fp32 adapters against a 16-bit x / dY) splits the fp32
operand into hi + lo parts in the 16-bit dtype and runs two 16-bit dots: the 16-bit operand is exact, so the product
keeps ~16 bits more than a single rounding (better than TF32, at the cost of one TF32 dot). fp32 × fp32 dots state
their precision: "tf32" when torch allows TF32 for fp32 matmuls, else "tf32x3"; "ieee" under the interpreter and on
AMD. Under ``TRITON_INTERPRET=1`` 16-bit dots are upcast to fp32 (``UPCAST``): triton 3.9's interpreter computes
bf16 ``tl.dot`` wrongly. FMA contraction is pinned on (``enable_fp_fusion=True``, docs/KERNELS.md §10.9).

Reductions across programs (split-K of F1, dS/dB of B1, dA of B3) use fp32 ``tl.atomic_add`` into zeroed buffers,
or, when ``torch.are_deterministic_algorithms_enabled()``, per-split workspaces summed by torch in a fixed order.

F2 and B2, the only kernels that read W, take a constexpr ``IS_INT8`` for int8 weight-only bases with a per-row
fp32 scale (``weight_scale`` of ``lora_linear_fwd`` / ``_bwd`` below); ``lora_int8.py`` states that variant.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .. import bind
from . import _configs, interpreting
from .dropout import dropout_keep, keep_threshold

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Pinned FMA contraction (Triton 3.10 flips the default of TRITON_DEFAULT_FP_FUSION to off).
_FP_FUSION = True

# ---------------------------------------------------------------------------------------------------------------
# Device helpers shared by the kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b for operands of one dtype; fp32 operands at PREC; UPCAST: the interpreter's fp32 detour."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dot_acc(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b where a and b may differ in dtype (one fp32, one 16-bit, both exact in their own dtype).

    The fp32 operand is split as hi = rn16(v), lo = rn16(v - hi) in the other operand's dtype: two 16-bit dots give
    v·w with a relative error ~2**-17 (bf16) instead of tl.dot's requirement to round v once to 16 bits.
    """
    if a.dtype == b.dtype:
        acc = _mma(a, b, acc, PREC, UPCAST)
    elif a.dtype == tl.float32:
        a_hi = a.to(b.dtype)
        a_lo = (a - a_hi.to(tl.float32)).to(b.dtype)
        acc = _mma(a_hi, b, acc, PREC, UPCAST)
        acc = _mma(a_lo, b, acc, PREC, UPCAST)
    else:
        b_hi = b.to(a.dtype)
        b_lo = (b - b_hi.to(tl.float32)).to(a.dtype)
        acc = _mma(a, b_hi, acc, PREC, UPCAST)
        acc = _mma(a, b_lo, acc, PREC, UPCAST)
    return acc


@triton.jit
def _lora_dot(a, b, acc, BASE_TY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b for a LoRA-term dot of a kernel whose base GEMM runs in BASE_TY (x's dtype).

    fp32 × fp32 (fp32 adapters against fp32 S or dS) in a 16-bit kernel runs as three bf16 dots,
    a_hi·b_hi + a_hi·b_lo + a_lo·b_hi with v = v_hi + v_lo + O(2**-18·|v|) (bf16 keeps fp32's range, fp16 would
    not), unless PREC is "tf32" (torch allows TF32, which is cheaper still). Relative error ~3·2**-18 per
    product, far below the 16-bit output's rounding; tf32x3 here made ptxas spill the whole wgmma accumulator
    on every large tile (255 registers). Everything else goes to ``_dot_acc``.
    """
    if a.dtype == tl.float32 and b.dtype == tl.float32 and BASE_TY != tl.float32 and PREC != "tf32":
        a_hi = a.to(tl.bfloat16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
        b_hi = b.to(tl.bfloat16)
        b_lo = (b - b_hi.to(tl.float32)).to(tl.bfloat16)
        acc = _mma(a_hi, b_lo, acc, PREC, UPCAST)  # the small terms first
        acc = _mma(a_lo, b_hi, acc, PREC, UPCAST)
        acc = _mma(a_hi, b_hi, acc, PREC, UPCAST)
    else:
        acc = _dot_acc(a, b, acc, PREC, UPCAST)
    return acc


@triton.jit
def _int8_to(w, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """An int8 W tile in ``dtype``, exact (integers <= 127 fit bf16's 8-bit significand): tl.dot needs equal
    operand dtypes, and an int8 x int8 dot would accumulate in int32 (docs/KERNELS.md §10.8). Under the interpreter via
    fp32: triton 3.9's interpreter casts int8 -> bf16 by reinterpreting bits (-120 -> nan)."""
    if UPCAST:
        return w.to(tl.float32).to(dtype)
    return w.to(dtype)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a 1-D launch, grouped GROUP_M row-tiles at a time so neighbours share W tiles in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _reduce_store(ptrs, val, mask, ATOMIC: tl.constexpr):
    """Partial sums: fp32 atomic add into a zeroed buffer, or a plain store into this split's own workspace slice."""
    if ATOMIC:
        tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, val, mask=mask)


@triton.jit
def _lora_term(
    acc, s_ptr, b_ptr, rows, cols, r, s_mult, stride_sm, stride_sr, stride_bn, stride_br,
    LORA_CHUNK: tl.constexpr, BASE_TY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """acc + (s_mult·S[rows, :])·B[cols, :]ᵀ in rank chunks of LORA_CHUNK (a 16-bit dot needs K >= 16; the last
    chunk is padded with zeros). S: (M, r) fp32; B: (N, r). s_mult scales the [BLOCK_M, LORA_CHUNK] S tile (one
    fp32 rounding) rather than the [BLOCK_M, BLOCK_N] product: fewer multiplies, and the caller's accumulator
    may already hold another term (the int8 base) that must not be scaled."""
    offs_c = tl.arange(0, LORA_CHUNK)
    for r0 in range(0, r, LORA_CHUNK):
        rr = r0 + offs_c
        s_tile = tl.load(s_ptr + rows[:, None] * stride_sm + rr[None, :] * stride_sr, mask=rr[None, :] < r, other=0.0)
        b_t = tl.load(b_ptr + rr[:, None] * stride_br + cols[None, :] * stride_bn, mask=rr[:, None] < r, other=0.0)
        acc = _lora_dot(s_tile * s_mult, b_t, acc, BASE_TY, PREC, UPCAST)
    return acc


# ---------------------------------------------------------------------------------------------------------------
# F1: S = (m ⊙ x) · Aᵀ / (1-p)
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _lora_shrink_kernel(
    # Pointers
    x_ptr,
    a_ptr,
    s_ptr,
    seed_ptr,
    # Dimensions
    M,
    K,
    r,
    k_tiles_per_split,
    p,
    inv_keep,
    # Strides
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_ss,
    stride_sm,
    stride_sr,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ATOMIC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """S[rows, :] (+)= Σ_{k in this split} x̂[rows, k]·A[:, k]; grid (M blocks, K splits).

    x: (M, K) any strides; A: (r, K); S: (splits, M, r) fp32 with stride_ss = 0 when the splits add atomically.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < r
    k_start = pid_k * k_tiles_per_split * BLOCK_K
    k_end = tl.minimum(K, k_start + k_tiles_per_split * BLOCK_K)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        threshold = keep_threshold(p)
    # int64 row offsets: M·stride_xm may exceed 2**31.
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    a_cols = a_ptr + offs_r.to(tl.int64)[None, :] * stride_ar

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(
            x_rows + offs_k.to(tl.int64)[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(seed, offs_m, k0, K, threshold, BLOCK_K), x, 0.0)
        a_t = tl.load(  # Aᵀ tile [BLOCK_K, BLOCK_R]
            a_cols + offs_k.to(tl.int64)[:, None] * stride_ak, mask=mask_k[:, None] & mask_r[None, :], other=0.0
        )
        acc = _dot_acc(x, a_t, acc, PREC, UPCAST)
    if HAS_DROPOUT:
        # 1/(1-p) once on the fp32 sum instead of on every element of x.
        acc = acc * inv_keep
    s_ptrs = (
        s_ptr + pid_k.to(tl.int64) * stride_ss + offs_m.to(tl.int64)[:, None] * stride_sm + offs_r[None, :] * stride_sr
    )
    _reduce_store(s_ptrs, acc, mask_m[:, None] & mask_r[None, :], ATOMIC)


# ---------------------------------------------------------------------------------------------------------------
# F2: y = x · Wᵀ + b + s·(S · Bᵀ + b_B)
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _linear_lora_fwd_kernel(
    # Pointers
    x_ptr,
    w_ptr,
    wscale_ptr,
    bias_ptr,
    s_ptr,
    b_ptr,
    bb_ptr,
    y_ptr,
    # Dimensions
    M,
    N,
    K,
    r,
    scaling,
    # Strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ws,
    stride_bias,
    stride_sm,
    stride_sr,
    stride_bn,
    stride_br,
    stride_bb,
    stride_ym,
    stride_yn,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LORA_CHUNK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA_BIAS: tl.constexpr,
    IS_INT8: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y; the low-rank term seeds the fp32 accumulator of the base GEMM.

    x: (M, K) any strides; W: (N, K) any strides (Conv1D's transposed view included); S: (M, r) fp32;
    B: (N, r); bias, b_B: (N,). y: (M, N) written once, in its own dtype.
    IS_INT8 (W8A16, lora_int8.py): W is int8 and wscale (N,) fp32 its per-row scale, y = (x·Wᵀ)⊙wscale + ...:
    each int8 tile is converted to x's dtype in registers (exact, |W| <= 127), the scale multiplies the fp32
    base accumulator after the K loop, and the LoRA term is added after that, so it is never scaled.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Rows/columns past the edge re-read valid ones (wrapped) instead of masking every main-loop load; the
    # store is masked. int64: M·stride_xm and N·stride_wn may exceed 2**31.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)

    # Pointer increments BLOCK_K·stride are 32-bit: fine while a stride along K stays below 2**31 / BLOCK_K.
    offs_k = tl.arange(0, BLOCK_K)
    if IS_INT8:
        # ---- base GEMM as yᵀ = W·xᵀ: the converted W tile is the MMA's first operand, which wgmma (sm_90) takes
        # from registers; as the second operand it would go back to shared memory before every MMA.
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        w_ptrs = w_ptr + cols[:, None] * stride_wn + offs_k.to(tl.int64)[None, :] * stride_wk  # W [BLOCK_N, BLOCK_K]
        xt_ptrs = x_ptr + rows[None, :] * stride_xm + offs_k.to(tl.int64)[:, None] * stride_xk  # xᵀ [BLOCK_K, BLOCK_M]
        for k0 in range(0, K, BLOCK_K):
            w = tl.load(w_ptrs, mask=offs_k[None, :] < K - k0, other=0)
            x_t = tl.load(xt_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
            acc_t = _dot_acc(_int8_to(w, x_t.dtype, UPCAST), x_t, acc_t, PREC, UPCAST)
            w_ptrs += BLOCK_K * stride_wk
            xt_ptrs += BLOCK_K * stride_xk
        # ---- per-row scale on the fp32 base sum (one multiply per output), then the unscaled LoRA term
        acc = tl.trans(acc_t) * tl.load(wscale_ptr + cols * stride_ws)[None, :]
        acc = _lora_term(
            acc, s_ptr, b_ptr, rows, cols, r, scaling, stride_sm, stride_sr, stride_bn, stride_br,
            LORA_CHUNK, x_ptr.dtype.element_ty, PREC, UPCAST,
        )  # fmt: skip
    else:
        # ---- LoRA term s·S·Bᵀ seeds the accumulator, then the base GEMM x·Wᵀ adds into it
        acc = _lora_term(
            tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), s_ptr, b_ptr, rows, cols, r, scaling,
            stride_sm, stride_sr, stride_bn, stride_br, LORA_CHUNK, x_ptr.dtype.element_ty, PREC, UPCAST,
        )  # fmt: skip
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk
        w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k.to(tl.int64)[:, None] * stride_wk  # Wᵀ [BLOCK_K, BLOCK_N]
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
            w_t = tl.load(w_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
            acc = _dot_acc(x, w_t, acc, PREC, UPCAST)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

    # ---- epilogue: biases in fp32, one rounding to y's dtype
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA_BIAS:
        acc += scaling * tl.load(bb_ptr + offs_n * stride_bb, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------------------------
# B1: dS = s·dY·B, dB = s·dYᵀ·S
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _lora_bwd_dys_dyb_kernel(
    # Pointers
    dy_ptr,
    b_ptr,
    s_ptr,
    ds_ptr,
    db_ptr,
    # Dimensions
    M,
    N,
    r,
    n_tiles_per_split,
    db_slots,
    scaling,
    # Strides
    stride_dym,
    stride_dyn,
    stride_bn,
    stride_br,
    stride_sm,
    stride_sr,
    stride_dss,
    stride_dsm,
    stride_dbs,
    stride_dbn,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NEED_DB: tl.constexpr,
    ATOMIC_DS: tl.constexpr,
    ATOMIC_DB: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Rows [pid_m·BLOCK_M, +BLOCK_M) × this split's columns of dY, each dY tile read once for both products.

    dY: (M, N); B: (N, r); S: (M, r) fp32. dS: (splits_n, M, r) fp32 (stride_dss = 0 when atomic);
    dB: (db_slots, N, r) fp32, row block pid_m adding into slot pid_m % db_slots: one slot per row block (plain
    stores, deterministic mode), or a few slots shared atomically (the first level of a two-level sum: at M = 8192
    128 row blocks would otherwise make 128-way fp32 atomics on each dB address). Both already scaled by s.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < r
    rows = offs_m.to(tl.int64)
    if NEED_DB:
        # S rows past M load as zeros, so they add nothing to dB.
        s_tile = tl.load(
            s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
    n_start = pid_n * n_tiles_per_split * BLOCK_N
    n_end = tl.minimum(N, n_start + n_tiles_per_split * BLOCK_N)

    acc_ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + offs_n.to(tl.int64)[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        b = tl.load(  # B tile [BLOCK_N, BLOCK_R]
            b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=mask_n[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc_ds = _dot_acc(dy, b, acc_ds, PREC, UPCAST)
        if NEED_DB:
            db = _dot_acc(tl.trans(dy), s_tile, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), PREC, UPCAST)
            db_ptrs = (
                db_ptr
                + (pid_m % db_slots).to(tl.int64) * stride_dbs
                + offs_n.to(tl.int64)[:, None] * stride_dbn
                + offs_r[None, :]
            )
            _reduce_store(db_ptrs, db * scaling, mask_n[:, None] & mask_r[None, :], ATOMIC_DB)
    ds_ptrs = ds_ptr + pid_n.to(tl.int64) * stride_dss + rows[:, None] * stride_dsm + offs_r[None, :]
    _reduce_store(ds_ptrs, acc_ds * scaling, mask_m[:, None] & mask_r[None, :], ATOMIC_DS)


# ---------------------------------------------------------------------------------------------------------------
# B2: dx = dY·W + m ⊙ (dS·A) / (1-p)
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _linear_lora_bwd_dx_kernel(
    # Pointers
    dy_ptr,
    w_ptr,
    wscale_ptr,
    ds_ptr,
    a_ptr,
    seed_ptr,
    dx_ptr,
    # Dimensions
    M,
    N,
    K,
    r,
    p,
    inv_keep,
    # Strides
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_ws,
    stride_dsm,
    stride_dsr,
    stride_ar,
    stride_ak,
    stride_dxm,
    stride_dxk,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LORA_CHUNK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IS_INT8: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of dx (BLOCK_N along x's K); the reduction runs over W's N in BLOCK_K steps.

    dY: (M, N); W: (N, K) any strides; dS: (M, r) fp32 (already scaled by s); A: (r, K). dx: (M, K).
    The LoRA term is computed first in its own fp32 tile, masked and rescaled, and only then seeds the base
    accumulator: the mask applies to the LoRA term alone.
    IS_INT8 (W8A16): W is int8 with per-row scale wscale (N,) fp32, dx = dY·(W⊙wscale[:, None]) + ...; the scale
    sits on the reduction axis, so each W tile is dequantized in registers (see the loop), never in HBM.
    """
    pid_m, pid_n = _tile_ids(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < K
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % K).to(tl.int64)

    # ---- LoRA term dS·A, masked with the forward's mask (logical coordinates (m, k) of x)
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_c = tl.arange(0, LORA_CHUNK)
    for r0 in range(0, r, LORA_CHUNK):
        rr = r0 + offs_c
        ds = tl.load(ds_ptr + rows[:, None] * stride_dsm + rr[None, :] * stride_dsr, mask=rr[None, :] < r, other=0.0)
        a = tl.load(a_ptr + rr[:, None] * stride_ar + cols[None, :] * stride_ak, mask=rr[:, None] < r, other=0.0)
        lora = _lora_dot(ds, a, lora, dy_ptr.dtype.element_ty, PREC, UPCAST)
    if HAS_DROPOUT:
        keep = dropout_keep(tl.load(seed_ptr), offs_m, pid_n * BLOCK_N, K, keep_threshold(p), BLOCK_N)
        lora = tl.where(keep, lora * inv_keep, 0.0)

    offs_k = tl.arange(0, BLOCK_K)
    if IS_INT8:
        # ---- base GEMM as dxᵀ = W_deqᵀ·dYᵀ: the dequantized W tile is the MMA's first operand, which wgmma (sm_90)
        # takes from registers; as the second operand it would go back to shared memory before every MMA.
        acc_t = tl.trans(lora)
        wt_ptrs = w_ptr + cols[:, None] * stride_wk + offs_k.to(tl.int64)[None, :] * stride_wn  # Wᵀ [BLOCK_N, BLOCK_K]
        dyt_ptrs = dy_ptr + rows[None, :] * stride_dym + offs_k.to(tl.int64)[:, None] * stride_dyn  # dYᵀ [BK, BM]
        for k0 in range(0, N, BLOCK_K):
            w_t = tl.load(wt_ptrs, mask=offs_k[None, :] < N - k0, other=0)
            dy_t = tl.load(dyt_ptrs, mask=offs_k[:, None] < N - k0, other=0.0)
            # Dequantize the tile: (int8 -> fp32)·scale[n] rounded once to dY's dtype, which is bit for bit the
            # reference's W_deq = (W_int8·scale).to(x.dtype), so the kernel differs from eager dY·W_deq only in
            # summation order. The alternative, (dY⊙scale) rounded to 16 bits against an exact int8 tile, has a
            # rounding of the same size (2**-9 bf16) but not the reference's, and converts both tiles.
            ws = tl.load(wscale_ptr + (k0 + offs_k) * stride_ws, mask=offs_k < N - k0, other=0.0)
            w_t = (w_t.to(tl.float32) * ws[None, :]).to(dy_t.dtype)
            acc_t = _dot_acc(w_t, dy_t, acc_t, PREC, UPCAST)
            wt_ptrs += BLOCK_K * stride_wn
            dyt_ptrs += BLOCK_K * stride_dyn
        acc = tl.trans(acc_t)
    else:
        # ---- base GEMM dY·W into the masked LoRA term
        acc = lora
        dy_ptrs = dy_ptr + rows[:, None] * stride_dym + offs_k.to(tl.int64)[None, :] * stride_dyn
        w_ptrs = w_ptr + offs_k.to(tl.int64)[:, None] * stride_wn + cols[None, :] * stride_wk  # W [BLOCK_K, BLOCK_N]
        for k0 in range(0, N, BLOCK_K):
            dy = tl.load(dy_ptrs, mask=offs_k[None, :] < N - k0, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < N - k0, other=0.0)
            acc = _dot_acc(dy, w, acc, PREC, UPCAST)
            dy_ptrs += BLOCK_K * stride_dyn
            w_ptrs += BLOCK_K * stride_wn

    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_n[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------------------------
# B3: dA = dSᵀ · (m ⊙ x) / (1-p)
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _lora_bwd_da_kernel(
    # Pointers
    x_ptr,
    ds_ptr,
    seed_ptr,
    da_ptr,
    # Dimensions
    M,
    K,
    r,
    m_tiles_per_split,
    p,
    inv_keep,
    # Strides
    stride_xm,
    stride_xk,
    stride_dsm,
    stride_dsr,
    stride_das,
    stride_dar,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ATOMIC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """dA[:, cols] (+)= Σ_{m in this split} dS[m, :]ᵀ·x̂[m, cols]; grid (K blocks, M splits).

    x: (M, K) any strides; dS: (M, r) fp32. dA: (splits, r, K) fp32 (stride_das = 0 when atomic).
    """
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < r
    m_start = pid_m * m_tiles_per_split * BLOCK_M
    m_end = tl.minimum(M, m_start + m_tiles_per_split * BLOCK_M)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        threshold = keep_threshold(p)
    cols = offs_k.to(tl.int64)

    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        rows = offs_m.to(tl.int64)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(seed, offs_m, pid_k * BLOCK_K, K, threshold, BLOCK_K), x, 0.0)
        ds = tl.load(  # dS rows past the split load as zeros
            ds_ptr + rows[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc = _dot_acc(tl.trans(ds), x, acc, PREC, UPCAST)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    da_ptrs = da_ptr + pid_m.to(tl.int64) * stride_das + offs_r[:, None] * stride_dar + cols[None, :]
    _reduce_store(da_ptrs, acc, mask_r[:, None] & mask_k[None, :], ATOMIC)


# ---------------------------------------------------------------------------------------------------------------
# Launch plumbing
# ---------------------------------------------------------------------------------------------------------------

KERNELS = {
    "lora_shrink": _lora_shrink_kernel,
    "linear_lora_fwd": _linear_lora_fwd_kernel,
    "lora_bwd_dys_dyb": _lora_bwd_dys_dyb_kernel,
    "linear_lora_bwd_dx": _linear_lora_bwd_dx_kernel,
    "lora_bwd_da": _lora_bwd_da_kernel,
}
# Autotune keys of the GEMM-shaped kernels: what changes the best config (the dtypes are appended by Triton).
_AUTOTUNE_KEYS = {
    "linear_lora_fwd": ["N", "K"],
    "linear_lora_bwd_dx": ["N", "K", "HAS_DROPOUT"],
}


def _fp32_precision() -> str:
    """input_precision of fp32 × fp32 dots: torch's fp32 matmul setting, read at call time (no caching)."""
    if interpreting() or torch.version.hip is not None:
        return "ieee"
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if setting in ("tf32", "ieee"):
        return "tf32" if setting == "tf32" else "tf32x3"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.cache
def _num_sms_cuda(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda" or interpreting():
        return _configs.INTERPRET_NUM_SMS
    return _num_sms_cuda(_device_index(device))


@functools.cache
def _autotuned_cached(op: str, arch: object, elem_bytes: int, bucket: str):
    if arch == "hip":
        configs = _configs.hip_configs(op, elem_bytes, bucket)
    else:
        configs = _configs.cuda_configs(op, arch, elem_bytes, bucket)
    return triton.autotune(configs=configs, key=_AUTOTUNE_KEYS[op])(KERNELS[op])


def _gemm_launcher(op: str, device: torch.device, elem_bytes: int, m: int):
    """The autotuned GEMM kernel for this device/dtype/M bucket; under the interpreter a one-config autotuner
    (no benchmarking) built per call, so tests can swap ``_configs.INTERPRET_CONFIGS``."""
    if interpreting() or device.type != "cuda":
        return triton.autotune(configs=[_configs.INTERPRET_CONFIGS[op]], key=_AUTOTUNE_KEYS[op])(KERNELS[op])
    arch = "hip" if torch.version.hip is not None else _capability(_device_index(device))
    return _autotuned_cached(op, arch, elem_bytes, _configs.m_bucket(m))


def _memory_bound_config(op: str, rank_block: int, device: torch.device) -> triton.Config:
    if interpreting() or device.type != "cuda":
        return _configs.INTERPRET_CONFIGS[op]
    return _configs.heuristic_config(op, rank_block)


def _splits(own_blocks: int, split_tiles: int, num_sms: int) -> tuple[int, int]:
    """(splits, tiles per split) along a reduction axis of ``split_tiles`` tiles, given ``own_blocks`` independent
    programs: split only until about 4 CTAs per SM are in flight (memory-bound kernels need the occupancy)."""
    target = 4 * num_sms
    splits = 1 if own_blocks >= target else max(1, min(split_tiles, triton.cdiv(target, own_blocks)))
    per = triton.cdiv(split_tiles, splits)
    return triton.cdiv(split_tiles, per), per


def _reduction_buffer(splits: int, shape: tuple[int, ...], device) -> tuple[torch.Tensor, int, bool]:
    """(buffer, split stride, atomic) for an fp32 sum over ``splits`` programs.

    1 split: plain stores into the result. Deterministic mode: a (splits, *shape) workspace, summed by torch in a
    fixed order afterwards. Otherwise: zeroed result + fp32 atomics (order-dependent in the last bits).
    """
    if splits == 1:
        return torch.empty(shape, dtype=torch.float32, device=device), 0, False
    if torch.are_deterministic_algorithms_enabled():
        ws = torch.empty((splits, *shape), dtype=torch.float32, device=device)
        return ws, ws.stride(0), False
    return torch.zeros(shape, dtype=torch.float32, device=device), 0, True


def _finish_reduction(buf: torch.Tensor, ndim: int) -> torch.Tensor:
    return buf.sum(0) if buf.dim() > ndim else buf


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _common(dropout_p, seeds, x):
    p = float(dropout_p[0])
    has_dropout = p > 0.0
    # Unused pointer when p = 0 (HAS_DROPOUT=False compiles the load away); any tensor will do.
    seed = seeds if has_dropout else x
    inv_keep = 1.0 / (1.0 - p) if has_dropout else 1.0
    return p, has_dropout, seed, inv_keep


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _shrink(x, a, p, has_dropout, seed, inv_keep, prec, upcast) -> torch.Tensor:
    """F1: S = (m ⊙ x)·Aᵀ/(1-p), (M, r) fp32."""
    M, K = x.shape
    r = a.shape[0]
    rank_block = _configs.rank_block(r)
    cfg = _memory_bound_config("lora_shrink", rank_block, x.device)
    block_m, block_k = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
    m_blocks = triton.cdiv(M, block_m)
    splits, per = _splits(m_blocks, triton.cdiv(K, block_k), _num_sms(x.device))
    buf, stride_split, atomic = _reduction_buffer(splits, (M, r), x.device)
    _lora_shrink_kernel[(m_blocks, splits)](
        x, a, buf, seed,
        M, K, r, per, p, inv_keep,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), stride_split, buf.stride(-2), buf.stride(-1),
        BLOCK_R=rank_block, HAS_DROPOUT=has_dropout, ATOMIC=atomic, PREC=prec, UPCAST=upcast,
        enable_fp_fusion=_FP_FUSION, **cfg.all_kwargs(),
    )  # fmt: skip
    return _finish_reduction(buf, 2)


def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    lora_b_bias: list[torch.Tensor | None],
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor | None,
    weight_scale: torch.Tensor | None = None,
    keep_masks: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y = x·Wᵀ + b + s·((m ⊙ x)·Aᵀ/(1-p)·Bᵀ + b_B); returns (y, [S]) as the reference does (one adapter).

    Args:
        x: (M, K) any strides.  weight: (N, K) any strides.  bias: (N,) or None.
        lora_a: [(r, K)].  lora_b: [(N, r)].  lora_b_bias: [(N,) or None].  scaling, dropout_p: [float].
        seeds: int64 (1,) when p > 0.
        weight_scale: None for a float weight of x's dtype; an int8 weight's fp32 per-row scale (N,) otherwise
            (F2 with IS_INT8, see ``lora_int8.py``).
        keep_masks: False here (the kernels regenerate the mask; ``not_supported_reasons`` declines True).
    Kernels: F1 (S, fp32) then F2 (y in x's dtype, one fp32 accumulator). The call must pass
    ``not_supported_reasons`` (the dispatcher's choice); it is not checked again here.
    """
    a, b, b_bias, s = lora_a[0], lora_b[0], lora_b_bias[0], float(scaling[0])
    M, K = x.shape
    N, r = weight.shape[0], a.shape[0]
    p, has_dropout, seed, inv_keep = _common(dropout_p, seeds, x)
    prec, upcast = _fp32_precision(), interpreting()
    with _device_guard(x):
        shrink = _shrink(x, a, p, has_dropout, seed, inv_keep, prec, upcast)
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        kernel = _gemm_launcher("linear_lora_fwd", x.device, x.element_size(), M)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        bias_arg = bias if bias is not None else y
        bb_arg = b_bias if b_bias is not None else y
        ws_arg = weight_scale if weight_scale is not None else y  # unused pointer unless IS_INT8
        kernel[grid](
            x, weight, ws_arg, bias_arg, shrink, b, bb_arg, y,
            M, N, K, r, s,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), ws_arg.stride(0), bias_arg.stride(0),
            shrink.stride(0), shrink.stride(1), b.stride(0), b.stride(1), bb_arg.stride(0), y.stride(0), y.stride(1),
            LORA_CHUNK=_configs.LORA_CHUNK, HAS_BIAS=bias is not None, HAS_LORA_BIAS=b_bias is not None,
            IS_INT8=weight_scale is not None, PREC=prec, UPCAST=upcast, enable_fp_fusion=_FP_FUSION,
        )  # fmt: skip
    return y, [shrink]


def lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    saved_s: list[torch.Tensor],
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor | None,
    output_mask: list[bool],
    weight_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
    """(dx, [dA], [dB]) of lora_linear_fwd (one adapter); what output_mask excludes is neither computed nor returned.

    Args:
        dy: (M, N).  x, weight, lora_a, lora_b, scaling, dropout_p, seeds, weight_scale: as in the forward.
        saved_s: [S], (M, r) fp32 from the forward.  output_mask: [need dx, need dA and dB].
    Kernels: B1 (dS, and dB when needed), then B2 (dx; the only one that reads the weight) and B3 (dA). dx in x's
    dtype; dA, dB in the adapters'. Not checked again here (see the forward).
    """
    return backward(dy, x, weight, weight_scale, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, output_mask)


def backward(
    dy, x, weight, weight_scale, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, output_mask, dx_launch=None
):
    """The body of ``lora_linear_bwd``: B1 + B2 + B3. Only B2 reads the weight; ``dx_launch`` (lora_4bit.py)
    replaces B2 for a weight format of its own (arguments already checked by the caller's capability check)."""
    need_dx, need_adapters = bool(output_mask[0]), bool(output_mask[1])
    if not (need_dx or need_adapters):
        return None, [], []
    a, b, shrink, s = lora_a[0], lora_b[0], saved_s[0], float(scaling[0])
    M, K = x.shape
    N, r = weight.shape[0], a.shape[0]
    p, has_dropout, seed, inv_keep = _common(dropout_p, seeds, x)
    prec, upcast = _fp32_precision(), interpreting()
    rank_block = _configs.rank_block(r)
    num_sms = _num_sms(x.device)
    dx, d_a, d_b = None, [], []
    with _device_guard(x):
        # ---- B1: dS (always: B2 and B3 need it) and dB, from one read of dY
        cfg = _memory_bound_config("lora_bwd_dys_dyb", rank_block, x.device)
        block_m, block_n = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        m_blocks = triton.cdiv(M, block_m)
        splits_n, per_n = _splits(m_blocks, triton.cdiv(N, block_n), num_sms)
        ds_buf, stride_dss, atomic_ds = _reduction_buffer(splits_n, (M, r), x.device)
        if not need_adapters:
            db_buf, stride_dbs, atomic_db, db_slots = ds_buf, 0, False, 1  # unused pointer (NEED_DB=False)
        elif m_blocks > 1 and not torch.are_deterministic_algorithms_enabled():
            # two levels: atomics into a few (N, r) slots (row block i into slot i % slots), then one torch sum
            db_slots = min(m_blocks, _configs.DB_ATOMIC_SLOTS)
            db_buf = torch.zeros((db_slots, N, r), dtype=torch.float32, device=x.device)
            stride_dbs, atomic_db = db_buf.stride(0), True
        else:  # one row block (plain stores), or the deterministic workspace (one slot per row block)
            db_buf, stride_dbs, atomic_db = _reduction_buffer(m_blocks, (N, r), x.device)
            db_slots = m_blocks if stride_dbs else 1
        _lora_bwd_dys_dyb_kernel[(m_blocks, splits_n)](
            dy, b, shrink, ds_buf, db_buf,
            M, N, r, per_n, db_slots, s,
            dy.stride(0), dy.stride(1), b.stride(0), b.stride(1), shrink.stride(0), shrink.stride(1),
            stride_dss, ds_buf.stride(-2), stride_dbs, db_buf.stride(-2),
            BLOCK_R=rank_block, NEED_DB=need_adapters, ATOMIC_DS=atomic_ds, ATOMIC_DB=atomic_db,
            PREC=prec, UPCAST=upcast, enable_fp_fusion=_FP_FUSION, **cfg.all_kwargs(),
        )  # fmt: skip
        d_shrink = _finish_reduction(ds_buf, 2)

        # ---- B2: dx = dY·W + m ⊙ (dS·A)/(1-p)
        if need_dx and dx_launch is not None:
            dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
            dx_launch(dy, d_shrink, a, seed, p, inv_keep, has_dropout, dx, prec, upcast)
        elif need_dx:
            dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
            kernel = _gemm_launcher("linear_lora_bwd_dx", x.device, dy.element_size(), M)
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)
            ws_arg = weight_scale if weight_scale is not None else dx  # unused pointer unless IS_INT8
            kernel[grid](
                dy, weight, ws_arg, d_shrink, a, seed, dx,
                M, N, K, r, p, inv_keep,
                dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), ws_arg.stride(0), d_shrink.stride(0),
                d_shrink.stride(1), a.stride(0), a.stride(1), dx.stride(0), dx.stride(1),
                LORA_CHUNK=_configs.LORA_CHUNK, HAS_DROPOUT=has_dropout, IS_INT8=weight_scale is not None,
                PREC=prec, UPCAST=upcast, enable_fp_fusion=_FP_FUSION,
            )  # fmt: skip

        # ---- B3: dA = dSᵀ·x̂
        if need_adapters:
            cfg = _memory_bound_config("lora_bwd_da", rank_block, x.device)
            block_m, block_k = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
            k_blocks = triton.cdiv(K, block_k)
            splits_m, per_m = _splits(k_blocks, triton.cdiv(M, block_m), num_sms)
            da_buf, stride_das, atomic_da = _reduction_buffer(splits_m, (r, K), x.device)
            _lora_bwd_da_kernel[(k_blocks, splits_m)](
                x, d_shrink, seed, da_buf,
                M, K, r, per_m, p, inv_keep,
                x.stride(0), x.stride(1), d_shrink.stride(0), d_shrink.stride(1), stride_das, da_buf.stride(-2),
                BLOCK_R=rank_block, HAS_DROPOUT=has_dropout, ATOMIC=atomic_da, PREC=prec, UPCAST=upcast,
                enable_fp_fusion=_FP_FUSION, **cfg.all_kwargs(),
            )  # fmt: skip
            d_a = [_finish_reduction(da_buf, 2).to(a.dtype)]
            d_b = [_finish_reduction(db_buf, 2).to(b.dtype)]
    return dx, d_a, d_b


# ---------------------------------------------------------------------------------------------------------------
# Capability
# ---------------------------------------------------------------------------------------------------------------


def not_supported_reasons(op_name: str, *args) -> list[str]:
    """Every reason this backend cannot run this call of ``lora_linear_fwd`` / ``lora_linear_bwd`` (empty: it can);
    ``args`` in the op's schema order (``backends/__init__.py``), trailing defaults optional."""
    call = bind(op_name, args)
    if op_name == "lora_linear_fwd":
        reasons = call_reasons(None, call.x, call.weight, call.weight_scale, call.bias, call.lora_a, call.lora_b,
                               call.lora_b_bias, [], call.dropout_p, call.seeds)  # fmt: skip
        if call.keep_masks and any(p > 0.0 for p in call.dropout_p):
            reasons.append("keep_masks=True (the kernels regenerate the dropout mask in the backward, keep none)")
        return reasons
    return call_reasons(call.dy, call.x, call.weight, call.weight_scale, None, call.lora_a, call.lora_b, [],
                        call.saved_s, call.dropout_p, call.seeds)  # fmt: skip


def call_reasons(dy, x, weight, weight_scale, bias, lora_a, lora_b, lora_b_bias, saved_s, dropout_p, seeds):
    """The checks of ``not_supported_reasons``, one list for both directions (dy None in the forward, bias None in
    the backward). ``weight_scale`` None: a float weight of x's dtype; else an int8 weight with an fp32 per-row
    scale of shape (N,)."""
    reasons: list[str] = []
    n = len(lora_a)
    if n != 1:
        reasons.append(f"{n} active adapters (the Triton kernels take exactly one; the reference takes several)")
        return reasons
    a, b = lora_a[0], lora_b[0]
    if x.dim() != 2 or weight.dim() != 2:
        reasons.append(f"x must be 2-D and weight 2-D, got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
        return reasons
    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or K == 0 or N == 0:
        reasons.append(f"empty problem (M={M}, K={K}, N={N})")
    if x.dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"x.dtype={x.dtype} (supported: float32, float16, bfloat16)")
    if weight_scale is None and weight.dtype != x.dtype:
        reasons.append(f"weight.dtype={weight.dtype} differs from x.dtype={x.dtype}")
    if weight_scale is not None:
        if weight.dtype != torch.int8:
            reasons.append(f"weight_int8.dtype={weight.dtype} (expected int8)")
        if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (N,):
            reasons.append(
                f"weight_scale is {weight_scale.dtype} of shape {tuple(weight_scale.shape)} (expected float32 ({N},))"
            )
    if bias is not None and bias.dtype != x.dtype:
        reasons.append(f"bias.dtype={bias.dtype} differs from x.dtype={x.dtype}")
    if a.dtype not in (x.dtype, torch.float32):
        reasons.append(f"lora_a.dtype={a.dtype} (supported: x.dtype={x.dtype} or float32)")
    if b.dtype != a.dtype:
        reasons.append(f"lora_b.dtype={b.dtype} differs from lora_a.dtype={a.dtype}")
    if dy is not None and dy.dtype != x.dtype:
        reasons.append(f"dy.dtype={dy.dtype} differs from x.dtype={x.dtype}")
    for t in saved_s:
        if t.dtype != torch.float32:
            reasons.append(f"saved_s dtype={t.dtype} (the kernels read fp32 S)")
    for t in lora_b_bias:
        if t is not None and t.dtype not in _SUPPORTED_DTYPES:
            reasons.append(f"lora_b_bias.dtype={t.dtype} (supported: float32, float16, bfloat16)")
    r = a.shape[0]
    if not 1 <= r <= _configs.MAX_RANK:
        reasons.append(f"rank r={r} outside 1..{_configs.MAX_RANK}")
    if weight.requires_grad:
        reasons.append("weight.requires_grad=True (the fused path never computes dW; the reference path does)")
    p = float(dropout_p[0])
    if not 0.0 <= p < 1.0:
        reasons.append(f"dropout_p={p} outside [0, 1)")
    if p > 0.0 and (seeds is None or seeds.dtype != torch.int64 or seeds.numel() < 1):
        reasons.append(f"dropout_p={p} needs an int64 seeds tensor, got {None if seeds is None else seeds.dtype}")
    tensors = [t for t in (dy, x, weight, weight_scale, bias, a, b, seeds, *saved_s, *lora_b_bias) if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        reasons.append(f"tensors on several devices: {sorted(str(d) for d in devices)}")
    if not interpreting():
        if x.device.type != "cuda":
            reasons.append(f"x is on {x.device} (needs a CUDA device, or TRITON_INTERPRET=1 for CPU tensors)")
        elif torch.version.hip is None:
            major, minor = _capability(_device_index(x.device))
            if major < 8:
                reasons.append(f"compute capability {major}.{minor} < 8.0 (bf16 and tf32 tl.dot need sm_80)")
    return reasons
