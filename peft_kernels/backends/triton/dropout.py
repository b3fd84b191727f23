"""LoRA dropout keep mask in Triton: the inline helper every LoRA kernel shares, and a standalone mask kernel.

Semantics (exactly ``backends/reference/dropout.py``)::

    keep[m, k] = tl.rand(seed, m * K + k) >= p          offset in int64, from the logical coordinate (m, k)

The offset depends on the element's logical coordinate only, never on the tile or the program id, so F1 (shrink),
B2 (dx) and B3 (dA) regenerate the same mask whatever their autotuned tile sizes, and the reference regenerates it
bit for bit on any device. ``p`` arrives as a kernel float argument (fp32), which is also how torch compares the
reference's float32 uniform with the Python float ``p``.

Cost: one Philox4x32-10 evaluation (10 rounds) per element and per kernel that needs the mask.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import interpreting


@triton.jit
def dropout_keep(seed, offs_m, offs_k, K, p):
    """keep[i, j] = tl.rand(seed, offs_m[i]·K + offs_k[j]) >= p, bool [len(offs_m), len(offs_k)].

    seed: int64 scalar (loaded from the seeds tensor).  offs_m, offs_k: int32 logical row/column indices.
    K: the number of columns of the masked matrix (x's in_features).  The product is formed in int64 so offsets
    past 2**31 (M·K > 2**31) stay exact; rows/columns outside the matrix produce values that callers mask out.
    """
    offsets = offs_m.to(tl.int64)[:, None] * K + offs_k.to(tl.int64)[None, :]
    return tl.rand(seed, offsets) >= p


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
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    seed = tl.load(seed_ptr)
    keep = dropout_keep(seed, offs_m, offs_k, K, p)
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
