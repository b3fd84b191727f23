"""The LoRA dropout mask spec (backends/reference/dropout.py), on CPU, without Triton.

- Philox4x32-10 known answer (Random123's kat_vectors: counter 0, key 0 -> first word 0x6627e8d5);
- the vectorised int64 implementation against an independent scalar Python one, for seeds and offsets that use
  both 32-bit words (negative seeds, offsets past 2**32);
- mask properties: logical offsets (a sub-block of a mask is the mask of the sub-block: tiling independence),
  keep rate within 4σ of 1-p, bitwise reproducible per seed, seeds matter;
- the CPU fast path of ``dropout_scaled_mask`` (torch's generator; not the spec) and its Philox override.
The Triton kernels' masks are compared with this spec under the interpreter in test_triton_interpret.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tolerances import EXACT, assert_close

from peft_kernels.backends.reference.dropout import (
    dropout_scaled_mask,
    lora_dropout_mask,
    philox_on_cpu,
    philox_uniform,
)

_M32 = 0xFFFFFFFF


def _philox_scalar(seed: int, offset: int) -> np.float32:
    """tl.rand(seed, offset) with Python integers: Philox4x32-10 on counter (offset_lo, offset_hi, 0, 0)."""
    seed &= 0xFFFFFFFFFFFFFFFF  # int64 -> uint64 bit pattern
    k0, k1 = seed & _M32, seed >> 32
    c0, c1, c2, c3 = offset & _M32, (offset >> 32) & _M32, 0, 0
    for _ in range(10):
        prod_b, prod_a = 0xCD9E8D57 * c2, 0xD2511F53 * c0
        c0, c1, c2, c3 = (
            ((prod_b >> 32) ^ c1 ^ k0) & _M32,
            prod_b & _M32,
            ((prod_a >> 32) ^ c3 ^ k1) & _M32,
            prod_a & _M32,
        )
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    u = c0 - 2**32 if c0 >= 2**31 else c0
    if u < 0:
        u = -u - 1
    return np.float32(u) * np.float32(4.6566127342e-10)


def test_philox_known_answer():
    # Random123 kat_vectors, philox4x32_10, counter (0, 0, 0, 0), key (0, 0): 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
    expected = np.float32(0x6627E8D5) * np.float32(4.6566127342e-10)
    assert philox_uniform(0, torch.tensor([0])).item() == float(expected)
    assert float(_philox_scalar(0, 0)) == float(expected)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 + 7, 2**62 - 1, -1, -(2**40) - 3])
def test_vectorised_philox_matches_scalar(seed):
    offsets = [0, 1, 2, 1000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**40 + 11, 2**62 + 1]
    got = philox_uniform(torch.tensor([seed], dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64))
    want = torch.tensor([_philox_scalar(seed, o) for o in offsets], dtype=torch.float32)
    assert_close(got, want, EXACT, name=f"seed {seed}")
    assert got.dtype == torch.float32 and bool(((got >= 0) & (got < 1)).all())


def test_mask_uses_logical_offsets():
    """A block of the (M, K) mask equals the mask computed for that block's own offsets: any tiling agrees."""
    seed = torch.tensor([987654321], dtype=torch.int64)
    rows, cols, p = 37, 130, 0.3
    full = lora_dropout_mask(seed, rows, cols, p)
    assert full.shape == (rows, cols) and full.dtype == torch.bool
    m0, k0 = 16, 64
    offs = (torch.arange(m0, rows)[:, None] * cols + torch.arange(k0, cols)[None, :]).to(torch.int64)
    assert torch.equal(full[m0:, k0:], philox_uniform(seed, offs) >= p)
    # Row prefixes are masks of fewer rows (the offset of (m, k) does not depend on M).
    assert torch.equal(full[:5], lora_dropout_mask(seed, 5, cols, p))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_within_4_sigma(p):
    rows, cols = 512, 256
    keep = lora_dropout_mask(torch.tensor([2024], dtype=torch.int64), rows, cols, p)
    sigma = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(keep.double().mean().item() - (1 - p)) <= 4 * sigma


def test_same_seed_same_mask_and_seeds_matter():
    a = lora_dropout_mask(torch.tensor([5], dtype=torch.int64), 64, 64, 0.2)
    b = lora_dropout_mask(torch.tensor([5], dtype=torch.int64), 64, 64, 0.2)
    c = lora_dropout_mask(torch.tensor([6], dtype=torch.int64), 64, 64, 0.2)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_mask_cpu_fast_path_and_philox_override(dtype):
    seed = torch.tensor([31337], dtype=torch.int64)
    rows, cols, p = 256, 128, 0.25
    fast = dropout_scaled_mask(seed, rows, cols, p, "cpu", dtype)
    assert torch.equal(fast, dropout_scaled_mask(seed, rows, cols, p, "cpu", dtype))  # reproducible per seed
    scale = torch.tensor(1.0 / (1.0 - p), dtype=dtype)
    assert bool(((fast == 0) | (fast == scale)).all())
    sigma = (p * (1 - p) / fast.numel()) ** 0.5
    assert abs((fast != 0).double().mean().item() - (1 - p)) <= 4 * sigma
    with philox_on_cpu():
        spec = dropout_scaled_mask(seed, rows, cols, p, "cpu", dtype)
    expected = lora_dropout_mask(seed, rows, cols, p).to(dtype) * scale
    assert_close(spec, expected, EXACT, name="philox scaled mask")
