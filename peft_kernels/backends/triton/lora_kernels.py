"""The Triton kernels of the fused LoRA linear, launched by ``lora.py`` (``lora_linear_fwd`` / ``lora_linear_bwd``
of ``backends/reference/lora.py``); their device helpers are in ``_device_helpers.py``.

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
fp32 scale (``weight_scale`` of ``lora.lora_linear_fwd`` / ``_bwd``); ``lora_int8.py`` states that variant.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._device_helpers import _dot_acc, _int8_to, _lora_dot, _lora_term, _reduce_store, _tile_ids
from .dropout import apply_keep_bits

# ---------------------------------------------------------------------------------------------------------------
# F1: S = (m ⊙ x) · Aᵀ / (1-p)
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _lora_shrink_kernel(
    # Pointers
    x_ptr,
    a_ptr,
    s_ptr,
    bits_ptr,
    # Dimensions
    M,
    K,
    r,
    k_tiles_per_split,
    inv_keep,
    # Strides
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_ss,
    stride_sm,
    stride_sr,
    stride_bm,
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
    bits: the packed keep mask of x (``dropout.dropout_bits``), int32 (M, ceil(K/32)), read only with HAS_DROPOUT.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < r
    k_start = pid_k * k_tiles_per_split * BLOCK_K
    k_end = tl.minimum(K, k_start + k_tiles_per_split * BLOCK_K)
    n_words = (K + 31) // 32  # the row length of the packed mask
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
            x = apply_keep_bits(x, bits_ptr, stride_bm, offs_m.to(tl.int64), k0, mask_m, n_words)
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
    bits_ptr,
    dx_ptr,
    # Dimensions
    M,
    N,
    K,
    r,
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
    stride_bm,
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
    bits: the forward's packed keep mask of x, int32 (M, ceil(K/32)), read only with HAS_DROPOUT.
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
        lora = apply_keep_bits(lora * inv_keep, bits_ptr, stride_bm, rows, pid_n * BLOCK_N, mask_m, (K + 31) // 32)

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
    bits_ptr,
    da_ptr,
    # Dimensions
    M,
    K,
    r,
    m_tiles_per_split,
    inv_keep,
    # Strides
    stride_xm,
    stride_xk,
    stride_dsm,
    stride_dsr,
    stride_das,
    stride_dar,
    stride_bm,
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
    bits: the forward's packed keep mask of x, int32 (M, ceil(K/32)), read only with HAS_DROPOUT.
    """
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < r
    m_start = pid_m * m_tiles_per_split * BLOCK_M
    m_end = tl.minimum(M, m_start + m_tiles_per_split * BLOCK_M)
    n_words = (K + 31) // 32  # the row length of the packed mask
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
            x = apply_keep_bits(x, bits_ptr, stride_bm, rows, pid_k * BLOCK_K, mask_m, n_words)
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
# The kernel table
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
