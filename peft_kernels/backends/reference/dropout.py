"""Pure-torch Philox4x32-10, bit-identical to Triton's ``tl.rand(seed, offset)``.

The LoRA kernels never store a dropout mask: they regenerate it from a per-call seed. This module is the
specification of that mask, so the reference backend (and every test) reproduces the exact mask a Triton
kernel draws, on any device.

Semantics (Triton 3.x ``triton/language/random.py``, ``tl.rand4x``)::

    counter = (offset_lo, offset_hi, 0, 0)      # offset int64 split into two uint32 words
    key     = (seed_lo, seed_hi)                # seed int64 split into two uint32 words
    10 rounds:  c0' = hi(RB*c2) ^ c1 ^ k0 ; c2' = hi(RA*c0) ^ c3 ^ k1 ; c1' = lo(RB*c2) ; c3' = lo(RA*c0)
                k0 += KA ; k1 += KB                   (all mod 2**32)
    per word c_j: u = int32(c_j) ; u = ~u if u < 0 ; uniform_j = u * 4.6566127342e-10   (float32, in [0, 1))
    mask of an (M, K) matrix, one Philox call per 4 columns, all four words used:
        offset = m * ceil(K / 4) + k // 4 ;  keep[m, k] = uniform_{k % 4}(seed, offset) >= p

All arithmetic is done in int64 tensors masked to 32 bits, so it runs on CPU and CUDA alike.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_N_ROUNDS = 10
# Triton's uint_to_uniform_float scale for 32-bit words: the largest value with INT32_MAX * scale < 1.0.
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a * b, with a a 32-bit constant and b uint32 in int64.

    The product needs 64 unsigned bits; int64 multiplication wraps modulo 2**64 (two's complement), so the
    bit pattern is exact, and ``(p >> 32) & MASK`` recovers the high word even when p reads as negative.
    """
    product = b * a
    return (product >> 32) & _MASK32, product & _MASK32


def _to_uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float of a uint32 word held in int64: float32 in [0, 1)."""
    as_int32 = torch.where(word >= 2**31, word - 2**32, word)
    as_int32 = torch.where(as_int32 < 0, -as_int32 - 1, as_int32)  # ~x for negative x
    return as_int32.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def philox_uniform4(seed: torch.Tensor | int, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(u0, u1, u2, u3) = tl.rand4x(seed, offsets): the four float32 words of one Philox4x32-10 call per offset.

    Args:
        seed: int64 scalar (Python int or a one-element tensor).
        offsets: int64 tensor of any shape, values >= 0.
    Returns: four float32 tensors with the shape of ``offsets``.
    """
    offsets = offsets.to(torch.int64)
    if isinstance(seed, torch.Tensor):
        seed_t = seed.reshape(()).to(device=offsets.device, dtype=torch.int64)
    else:
        seed_t = torch.tensor(seed, dtype=torch.int64, device=offsets.device)
    # seed.to(uint64) then split: the bit pattern of a negative int64 seed is kept.
    k0 = seed_t & _MASK32
    k1 = (seed_t >> 32) & _MASK32
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return tuple(_to_uniform(c) for c in (c0, c1, c2, c3))


def philox_uniform(seed: torch.Tensor | int, offsets: torch.Tensor) -> torch.Tensor:
    """uniform[i] = tl.rand(seed, offsets[i]) as float32: the first word of ``philox_uniform4``."""
    return philox_uniform4(seed, offsets)[0]


def lora_dropout_mask(seed: torch.Tensor | int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """keep[m, k] = uniform_{k % 4}(seed, m * ceil(cols / 4) + k // 4) >= p, shape [rows, cols], bool.

    The offset depends only on the logical coordinate, so a kernel with any tiling (tiles start at multiples of 4
    columns) regenerates the same mask; one Philox call covers 4 columns of a row.
    """
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu")
    groups = (cols + 3) // 4
    offsets = torch.arange(rows * groups, device=device, dtype=torch.int64).reshape(rows, groups)
    words = torch.stack(philox_uniform4(seed, offsets), dim=-1)  # [rows, groups, 4]: column 4·group + j
    return words.reshape(rows, groups * 4)[:, :cols] >= p


# CPU tensors: the Philox spec above costs ~140 int64 passes over the M×K/4 counters (seconds per LoRA'd layer on a
# 2-core box, measured 1.6 s at 512×768 vs 2 ms for torch.rand), which would make CPU training with dropout
# 20× slower than PEFT. On CPU the reference therefore draws the mask from torch's CPU generator seeded with the
# same per-call seed (15 random bits per element compared with p·2¹⁵): the same distribution (p to within 2⁻¹⁶),
# the same mask in forward and backward, reproducible under torch.manual_seed, but not bit-identical to the GPU
# kernels. PEFT_KERNELS_CPU_DROPOUT=philox (or
# ``philox_on_cpu()``) restores the spec on CPU, e.g. to compare with Triton under TRITON_INTERPRET=1.
_CPU_DROPOUT_ENV = "PEFT_KERNELS_CPU_DROPOUT"
_CPU_BITS_RANGE = 2**15  # each element's uniform bits: [0, 2**15)
_force_philox_on_cpu = False


class philox_on_cpu:
    """Context manager: CPU masks use the Philox spec (bit-identical to the Triton kernels)."""

    def __enter__(self):
        global _force_philox_on_cpu
        self._previous = _force_philox_on_cpu
        _force_philox_on_cpu = True
        return self

    def __exit__(self, *exc):
        global _force_philox_on_cpu
        _force_philox_on_cpu = self._previous
        return False


def _cpu_uses_philox() -> bool:
    import os

    return _force_philox_on_cpu or os.environ.get(_CPU_DROPOUT_ENV, "").lower() == "philox"


def dropout_keep_mask(seed: torch.Tensor | int, rows: int, cols: int, p: float, device) -> torch.Tensor:
    """m (bool [rows, cols]): the mask the reference backend applies to x, forward and backward.

    The Philox spec (``lora_dropout_mask``) on accelerators and when forced on CPU; otherwise, on CPU,
    ``bits >= round(p · 2¹⁵)`` with bits uniform on [0, 2¹⁵) from a CPU generator seeded with ``seed`` (no int64
    arithmetic; see above): keep probability 1 - p up to 2⁻¹⁶ (p rounded to a multiple of 2⁻¹⁵).
    """
    device = torch.device(device)
    if device.type != "cpu" or _cpu_uses_philox():
        return lora_dropout_mask(seed, rows, cols, p, device=device)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)  # a CPU tensor: reading it is not a device sync
    # Two elements per generator word: int32 random_ gives 31 random bits, read as two int16 halves with 15 bits
    # each (the high half's sign bit is always 0; the low half's is masked off). An int compare, no float
    # conversion: the mask costs half the generator calls of rand + compare (the generator is serial).
    n = rows * cols
    words = torch.empty(((n + 1) // 2,), dtype=torch.int32).random_(generator=generator)
    halves = words.view(torch.int16)[:n].view(rows, cols).bitwise_and_(_CPU_BITS_RANGE - 1)
    return halves >= round(p * _CPU_BITS_RANGE)


def dropout_scaled_mask(seed: torch.Tensor | int, rows: int, cols: int, p: float, device, dtype) -> torch.Tensor:
    """m / (1 - p) in ``dtype``, [rows, cols], with m = ``dropout_keep_mask``."""
    return dropout_keep_mask(seed, rows, cols, p, device).to(dtype).mul_(1.0 / (1.0 - p))
