"""The LoRA dropout mask spec (backends/reference/dropout.py), on CPU, without Triton.

- Philox4x32-10 known answer (Random123's kat_vectors: counter 0, key 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8);
- the vectorised int64 implementation against an independent scalar Python one, for seeds and offsets that use
  both 32-bit words (negative seeds, offsets past 2**32);
- the mask layout: one Philox call per 4 columns of a row, word k % 4 for column k (against the scalar one);
- mask properties: logical offsets (a sub-block of a mask is the mask of the sub-block: tiling independence),
  keep rate within 4σ of 1-p, bitwise reproducible per seed, seeds matter;
- the CPU fast path of ``dropout_scaled_mask`` (torch's generator; not the spec) and its Philox override.
The Triton kernels' masks are compared with this spec under the interpreter in test_triton_lora.py.
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
    philox_uniform4,
)

_M32 = 0xFFFFFFFF


def _philox_scalar(seed: int, offset: int) -> list[np.float32]:
    """tl.rand4x(seed, offset) with Python integers: Philox4x32-10 on counter (offset_lo, offset_hi, 0, 0)."""
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
    words = []
    for c in (c0, c1, c2, c3):
        u = c - 2**32 if c >= 2**31 else c
        if u < 0:
            u = -u - 1
        words.append(np.float32(u) * np.float32(4.6566127342e-10))
    return words


def test_philox_known_answer():
    # Random123 kat_vectors, philox4x32_10, counter (0, 0, 0, 0), key (0, 0): 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
    # Triton's uint_to_uniform_float: a word w >= 2**31 is a negative int32, mapped to ~w = 2**32 - w - 1.
    expected = [np.float32(int(w) if w < 2**31 else 2**32 - int(w) - 1) * np.float32(4.6566127342e-10)
                for w in (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)]  # fmt: skip
    got = philox_uniform4(0, torch.tensor([0]))
    assert [u.item() for u in got] == [float(e) for e in expected]
    assert [float(u) for u in _philox_scalar(0, 0)] == [float(e) for e in expected]
    assert philox_uniform(0, torch.tensor([0])).item() == float(expected[0])


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 + 7, 2**62 - 1, -1, -(2**40) - 3])
def test_vectorised_philox_matches_scalar(seed):
    offsets = [0, 1, 2, 1000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**40 + 11, 2**62 + 1]
    got = philox_uniform4(torch.tensor([seed], dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64))
    for j in range(4):
        want = torch.tensor([_philox_scalar(seed, o)[j] for o in offsets], dtype=torch.float32)
        assert_close(got[j], want, EXACT, name=f"seed {seed} word {j}")
        assert got[j].dtype == torch.float32 and bool(((got[j] >= 0) & (got[j] < 1)).all())


@pytest.mark.parametrize("cols", [13, 16])
def test_mask_layout_one_call_per_four_columns(cols):
    """keep[m, k] = word k % 4 of the call at offset m·ceil(K/4) + k // 4, element by element against the scalar
    Philox (K = 13: the last group of a row is partial and the next row starts a new group)."""
    seed, rows, p = -(2**35) + 17, 6, 0.4
    mask = lora_dropout_mask(torch.tensor([seed], dtype=torch.int64), rows, cols, p)
    groups = (cols + 3) // 4
    want = torch.tensor(
        [[_philox_scalar(seed, m * groups + k // 4)[k % 4] >= np.float32(p) for k in range(cols)] for m in range(rows)]
    )
    assert torch.equal(mask, want)


def test_mask_uses_logical_offsets():
    """A block of the (M, K) mask starting at a multiple of 4 columns equals the mask computed from that block's
    own offsets: any tiling whose tiles start at multiples of 4 agrees."""
    seed = torch.tensor([987654321], dtype=torch.int64)
    rows, cols, p = 37, 130, 0.3
    full = lora_dropout_mask(seed, rows, cols, p)
    assert full.shape == (rows, cols) and full.dtype == torch.bool
    m0, k0 = 16, 64
    offs = torch.arange(m0, rows)[:, None] * ((cols + 3) // 4) + torch.arange(k0 // 4, (cols + 3) // 4)[None, :]
    block = torch.stack(philox_uniform4(seed, offs.to(torch.int64)), dim=-1).reshape(rows - m0, -1)[:, : cols - k0]
    assert torch.equal(full[m0:, k0:], block >= p)
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
