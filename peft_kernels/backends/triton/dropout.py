"""LoRA dropout keep mask in Triton: the mask kernel that evaluates the spec once per call into a packed bitmask,
and the device helper with which F1 (shrink), B2 (dx) and B3 (dA) apply it.

Semantics (exactly ``backends/reference/dropout.py``): one Philox4x32-10 call per 4 columns, all four words used::

    (u0, u1, u2, u3) = tl.rand4x(seed, m * ceil(K / 4) + k // 4)     offset in int64, from the logical (m, k)
    keep[m, k] = u_{k % 4} >= p

Packed form (``dropout_bits``), independent of any tile size::

    bits: int32 [M, ceil(K / 32)],   column 32·g + 2q + h of row m at bit q + 16·h of bits[m, g]   (q < 16, h < 2)
    bits past K are 0

Why packed: F1 and B3 touch every element of x once, so drawing Philox inline (one ~65-instruction call per 4
elements) cost 2.7-4.4x the SASS of their main loops. The mask kernel pays the Philox work once per call (M·K/4
calls) and writes M·K/8 bytes; the kernels read one word per 32 elements. The pair layout (columns 2q and 2q + 1
at bits q and q + 16) makes ``((w >> q) & 0x10001)·0xFFFF`` the AND mask of the two 16-bit elements that share a
register: about 2 instructions per element (docs/KERNEL_RESOURCES.md). The offsets depend on the logical
coordinate only, so the bits equal the reference's mask bit for bit whatever the mask kernel's tiling.

``keep_threshold`` (host, once per p) turns ``uniform >= p`` into one integer comparison per Philox word.
"""

from __future__ import annotations

import contextlib
import functools

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


@functools.lru_cache(maxsize=64)
def keep_threshold(p: float) -> int:
    """T with  uniform(word) >= p  <=>  v(word) > T,  v(word) = int32(word) ^ (int32(word) >> 31)  (host, cached).

    uniform(word) = fl(fl(v)·scale) (Triton's uint_to_uniform_float: v = ~word for a negative int32, else word) is
    non-decreasing in v, so the float comparison of the spec is an integer one against the last v it rejects:
    found by a 32-step bisection over v in [0, 2**31] with the spec's own fp32 arithmetic (p rounded to fp32 as the
    reference's float32 comparison does), so it agrees bit for bit. T = -1 keeps everything (p <= 0);
    T = 2**31 - 1 keeps nothing.
    """
    p32 = torch.tensor(p, dtype=torch.float32)
    scale = torch.tensor(_UNIFORM_SCALE.value, dtype=torch.float32)
    lo, hi = 0, 2**31  # the first kept v lies in [lo, hi]; hi = 2**31 means none is
    while lo < hi:
        mid = (lo + hi) // 2
        if bool(torch.tensor(float(mid), dtype=torch.float32) * scale >= p32):
            hi = mid
        else:
            lo = mid + 1
    return hi - 1


@triton.jit
def _bit_of_column(j):
    """The bit of column 32·g + j in word g (j < 32): column pairs (2q, 2q + 1) sit at bits q and q + 16."""
    return j // 2 + 16 * (j % 2)


@triton.jit
def _keep_bit(word, threshold, col_ok, j: tl.constexpr):
    """Column j's bit of a mask word (0, or 1 << _bit_of_column(j)) from its Philox word: kept when v > T."""
    v = word.to(tl.int32, bitcast=True)
    kept = ((v ^ (v >> 31)) > threshold) & col_ok
    return kept.to(tl.int32) << _bit_of_column(j)


@triton.jit
def _lora_dropout_bits_kernel(
    # Pointers
    seed_ptr,
    bits_ptr,
    # Dimensions
    M,
    K,
    threshold,
    # Strides
    stride_bm,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """bits[rows, words] for one (BLOCK_M, BLOCK_W) tile of the packed (M, ceil(K/32)) mask.

    Word g of row m holds columns 32g .. 32g + 31, i.e. the Philox calls at offsets m·ceil(K/4) + 8g + i, i < 8:
    eight calls per word, each setting the bits of its four columns, so a word is built in one thread's registers
    (no reduction across threads). threshold: ``keep_threshold(p)``.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    seed = tl.load(seed_ptr)
    # int64 offsets: M·K/4 may exceed 2**32 (both counter words are used)
    first_call = offs_m.to(tl.int64)[:, None] * ((K + 3) // 4) + (offs_w.to(tl.int64) * 8)[None, :]
    col0 = offs_w[None, :] * 32  # the word's first column
    words = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.int32)
    for i in tl.static_range(8):
        w0, w1, w2, w3 = _philox4x32_10(seed, first_call + i)
        words |= _keep_bit(w0, threshold, col0 + (4 * i + 0) < K, 4 * i + 0)
        words |= _keep_bit(w1, threshold, col0 + (4 * i + 1) < K, 4 * i + 1)
        words |= _keep_bit(w2, threshold, col0 + (4 * i + 2) < K, 4 * i + 2)
        words |= _keep_bit(w3, threshold, col0 + (4 * i + 3) < K, 4 * i + 3)
    mask = (offs_m[:, None] < M) & (offs_w[None, :] < (K + 31) // 32)
    tl.store(bits_ptr + offs_m.to(tl.int64)[:, None] * stride_bm + offs_w[None, :], words, mask=mask)


@triton.jit
def apply_keep_bits(x, bits_ptr, stride_bm, rows, k_start, mask_rows, n_words):
    """m ⊙ x for the tile x [len(rows), BLOCK_K] at columns k_start + j, the mask read from the packed bits.

    x: 16-bit or fp32, [BLOCK_M, BLOCK_K] with BLOCK_K a multiple of 32 and k_start a multiple of 32.
    rows: int64 row indices; mask_rows: the rows that exist; n_words = ceil(K / 32) (words past it read as 0).
    Loads the [BLOCK_M, BLOCK_K / 32] words of the tile. Pair q of a word (bits q and q + 16) becomes the 32-bit
    mask ((w >> q) & 0x10001)·0xFFFF, whose halves are the AND masks of columns 2q and 2q + 1: for 16-bit x, one
    shift, AND, multiply and AND per two elements (the pair shares a register), no select.
    """
    BLOCK_M: tl.constexpr = x.shape[0]
    BLOCK_K: tl.constexpr = x.shape[1]
    tl.static_assert(BLOCK_K % 32 == 0, "a tile masked from the packed bits must span whole 32-column words")
    offs_w = k_start // 32 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(
        bits_ptr + rows[:, None] * stride_bm + offs_w[None, :],
        mask=mask_rows[:, None] & (offs_w < n_words)[None, :],
        other=0,
    )
    pairs = ((words[:, :, None] >> tl.arange(0, 16)[None, None, :]) & 0x10001) * 0xFFFF
    pairs = tl.reshape(pairs, (BLOCK_M, BLOCK_K // 2))
    # int16 0 (dropped) or -1 (kept) per element: the low half for column 2q, the high half for 2q + 1
    halves = tl.reshape(tl.join(pairs.to(tl.int16), (pairs >> 16).to(tl.int16)), (BLOCK_M, BLOCK_K))
    if x.dtype.primitive_bitwidth == 16:
        return (x.to(tl.int16, bitcast=True) & halves).to(x.dtype, bitcast=True)
    return tl.where(halves != 0, x, 0.0)


# Tile of the mask kernel: 32 rows x 4 words (128 columns), 4 warps: one word (32 elements) per thread.
_BITS_BLOCK_M = 32
_BITS_BLOCK_W = 4


def dropout_bits(seed: torch.Tensor, rows: int, cols: int, p: float, block_m: int = _BITS_BLOCK_M,
                 block_w: int = _BITS_BLOCK_W) -> torch.Tensor:  # fmt: skip
    """bits (int32 [rows, ceil(cols / 32)]): the packed keep mask of an (rows, cols) x, drawn by the mask kernel.

    Args:
        seed: int64 tensor with one element, on the device the kernel runs on.
        rows, cols: the mask shape (M, K).  p: dropout probability.
        block_m, block_w: tile sizes (rows, words); any choice gives the same bits.
    """
    if not interpreting() and not seed.is_cuda:
        raise ValueError(f"seed is on {seed.device}; the Triton mask kernel needs a CUDA tensor or TRITON_INTERPRET=1")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed must be one int64 element, got dtype {seed.dtype} with {seed.numel()} elements")
    out = torch.empty((rows, triton.cdiv(cols, 32)), dtype=torch.int32, device=seed.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out.shape[1], block_w))
    with torch.cuda.device(seed.device) if seed.is_cuda else contextlib.nullcontext():
        _lora_dropout_bits_kernel[grid](seed, out, rows, cols, keep_threshold(float(p)), out.stride(0),
                                        BLOCK_M=block_m, BLOCK_W=block_w)  # fmt: skip
    return out


def unpack_bits(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """keep (bool [rows, cols]) of a packed bitmask (torch ops; tests and debugging)."""
    j = torch.arange(32, device=bits.device, dtype=torch.int32)
    lanes = (bits[:, :, None] >> (j // 2 + 16 * (j % 2))) & 1  # an arithmetic shift leaves the bit in lane 0 too
    return lanes.reshape(bits.shape[0], -1)[:, :cols] != 0


def lora_dropout_mask(seed: torch.Tensor, rows: int, cols: int, p: float, block_m: int = 32, block_w: int = 2):
    """keep [rows, cols] bool: the mask kernel's bits, unpacked (tests; debugging)."""
    return unpack_bits(dropout_bits(seed, rows, cols, p, block_m, block_w), cols)
