"""Device functions (``@triton.jit``) shared by the LoRA kernels of ``lora_kernels.py``: the dots and their
precision rules (docs/KERNELS.md §2), the int8 tile conversion, the grouped tile order, the reduction store and the
rank-chunked LoRA term. Numerics are stated in ``lora_kernels.py``'s docstring.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
