"""LoRA dropout keep mask in Triton: the inline helper every LoRA kernel shares, and a standalone mask kernel.

Semantics (exactly ``backends/reference/dropout.py``): one Philox4x32-10 call per 4 columns, all four words used::

    (u0, u1, u2, u3) = tl.rand4x(seed, m * ceil(K / 4) + k // 4)     offset in int64, from the logical (m, k)
    keep[m, k] = u_{k % 4} >= p

The offset depends on the element's logical coordinate only, never on the tile or the program id, so F1 (shrink),
B2 (dx) and B3 (dA) regenerate the same mask whatever their autotuned tile sizes, and the reference regenerates it
bit for bit on any device. ``p`` arrives as a kernel float argument (fp32), which is also how torch compares the
reference's float32 uniform with the Python float ``p``.

Cost: one Philox4x32-10 evaluation (10 rounds, 20 wide multiplies) per 4 elements and per kernel that needs the
mask (a quarter of drawing one ``tl.rand`` per element, which throws three of Philox's four words away), and the
``uniform >= p`` test as one integer comparison against a per-program threshold (no int -> float conversion).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import interpreting

_KEY_A: tl.constexpr = tl.constexpr(0x9E3779B9)
_KEY_B: tl.constexpr = tl.constexpr(0xBB67AE85)
_ROUND_A: tl.constexpr = tl.constexpr(0xD2511F53)
_ROUND_B: tl.constexpr = tl.constexpr(0xCD9E8D57)
# Triton's uint_to_uniform_float scale for 32-bit words (the reference's _UNIFORM_SCALE).
_UNIFORM_SCALE: tl.constexpr = tl.constexpr(4.6566127342e-10)


@triton.jit
def _philox4x32_10(seed, offsets):
    """The four uint32 words of Philox4x32-10 at counter (offset_lo, offset_hi, 0, 0), key = seed: the words of
    ``tl.randint4x(seed, offsets)``, written with one 32x32 -> 64-bit multiply per product (a single IMAD.WIDE)
    where ``tl.randint4x`` issues umulhi and mul separately (two IMADs)."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    offsets = offsets.to(tl.uint64)
    c0 = (offsets & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((offsets >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        prod_b = c2.to(tl.uint64) * _ROUND_B
        prod_a = c0.to(tl.uint64) * _ROUND_A
        c0, c1, c2, c3 = (
            (prod_b >> 32).to(tl.uint32) ^ c1 ^ k0,
            prod_b.to(tl.uint32),
            (prod_a >> 32).to(tl.uint32) ^ c3 ^ k1,
            prod_a.to(tl.uint32),
        )
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
    return c0, c1, c2, c3


@triton.jit
def keep_threshold(p):
    """T (int32 scalar) with  uniform(word) >= p  <=>  v(word) > T,  v(word) = int32(word) ^ (int32(word) >> 31).

    uniform(word) = fl(fl(v)·scale) (Triton's uint_to_uniform_float: v = ~word for a negative int32, else word) is
    non-decreasing in v, so the float comparison of the spec is an integer one against the last v it rejects:
    found by a 32-step bisection over v in [0, 2**31] run once per program with the spec's own fp32 arithmetic,
    so it agrees bit for bit. T = -1 keeps everything (p <= 0); T = 2**31 - 1 keeps nothing.
    """
    lo = tl.full((), 0, tl.int64)  # the first kept v lies in [lo, hi]; hi = 2**31 means none is
    hi = tl.full((), 2**31, tl.int64)
    for _ in tl.static_range(32):
        mid = (lo + hi) // 2
        kept = (mid.to(tl.float32) * _UNIFORM_SCALE) >= p
        hi = tl.where(kept, mid, hi)
        lo = tl.where(kept, lo, mid + 1)
    return (hi - 1).to(tl.int32)


@triton.jit
def dropout_keep(seed, offs_m, k_start, K, threshold, BLOCK_K: tl.constexpr):
    """keep[i, j] for rows offs_m[i] and columns k_start + j, j < BLOCK_K: bool [len(offs_m), BLOCK_K].

    seed: int64 scalar (loaded from the seeds tensor).  offs_m: int32 logical row indices.  k_start: the first
    column, a multiple of 4 (tiles start at multiples of their power-of-two width >= 16).  K: the number of
    columns of the masked matrix (x's in_features).  threshold: ``keep_threshold(p)``, computed once per program.
    Offsets are int64, so M·K past 2**31 stays exact; rows/columns outside the matrix produce values that callers
    mask out.
    """
    groups = (k_start // 4 + tl.arange(0, BLOCK_K // 4)).to(tl.int64)
    offsets = offs_m.to(tl.int64)[:, None] * ((K + 3) // 4) + groups[None, :]
    w0, w1, w2, w3 = _philox4x32_10(seed, offsets)
    # [rows, groups, i, j] = w_{2i+j}; row-major flattening puts w_c at column 4·group + c.
    w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (offs_m.shape[0], BLOCK_K)).to(tl.int32, bitcast=True)
    return (w ^ (w >> 31)) > threshold


@triton.jit
def _lora_dropout_mask_kernel(
    # Pointers
    seed_ptr,
    out_ptr,
    # Dimensions
    M,
    K,
    p,
    # Strides
    stride_om,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[m, k] = keep[m, k] for one (BLOCK_M, BLOCK_K) tile of the (M, K) mask."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_start = tl.program_id(1) * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    seed = tl.load(seed_ptr)
    keep = dropout_keep(seed, offs_m, k_start, K, keep_threshold(p), BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :], keep, mask=mask)


def lora_dropout_mask(seed: torch.Tensor, rows: int, cols: int, p: float, block_m: int = 32, block_k: int = 64):
    """keep [rows, cols] bool, drawn by the same inline code as the LoRA kernels (tests; debugging).

    Args:
        seed: int64 tensor with one element, on the device the kernel runs on.
        rows, cols: the mask shape (M, K).  p: dropout probability.
        block_m, block_k: tile sizes; any choice gives the same mask (that is the point of the logical offsets).
    """
    if not interpreting() and not seed.is_cuda:
        raise ValueError(f"seed is on {seed.device}; the Triton mask kernel needs a CUDA tensor or TRITON_INTERPRET=1")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed must be one int64 element, got dtype {seed.dtype} with {seed.numel()} elements")
    out = torch.empty((rows, cols), dtype=torch.bool, device=seed.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_k))
    with torch.cuda.device(seed.device) if seed.is_cuda else contextlib.nullcontext():
        _lora_dropout_mask_kernel[grid](
            seed, out, rows, cols, float(p), out.stride(0), BLOCK_M=block_m, BLOCK_K=block_k
        )
    return out
