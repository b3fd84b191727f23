"""Tile configurations of the Triton LoRA kernels, as data (docs/ARCHITECTURE.md §5.8, docs/KERNELS.md §4 and §10.6).

Two kinds of kernel:

- GEMM-shaped, compute-bound at training shapes: F2 ``linear_lora_fwd`` (y tile [BLOCK_M, BLOCK_N], reduction
  over x's K in BLOCK_K steps) and B2 ``linear_lora_bwd_dx`` (dx tile [BLOCK_M, BLOCK_N] along x's K, reduction
  over W's N in BLOCK_K steps). Autotuned over a short list per (compute capability, M bucket); the autotune key is
  (N, K) plus the operand dtypes (which Triton's autotuner appends itself), and B2 adds HAS_DROPOUT (the mask
  epilogue changes register pressure). M enters only through the bucket, so a training run whose sequence length
  varies does not re-tune on every new M.
- Memory-bound (intensity ≈ r FLOP/B): F1 ``lora_shrink``, B1 ``lora_bwd_dys_dyb``, B3 ``lora_bwd_da``. One
  heuristic config per padded rank R; the launcher sizes their split counts from the SM count.

Any GPU that is not sm_80 or sm_90 gets DEFAULT lists (about 48 KiB of pipelined operand tiles per CTA, within the
99 KiB of sm_86/sm_89 and the 64 KiB of sm_75): an untuned GPU is slower, never an error (docs/KERNELS.md §10.6).

The lists are written for 16-bit operands; for fp32 operands ``for_element_size`` halves BLOCK_K (the reduction
tile) so that a pipeline stage holds the same bytes. Every (op, capability, dtype, config) is compiled ahead of time
for sm_80 and sm_90 by tests/kernels/test_triton_aot.py, which also checks the shared memory against the limits
below (the KiB figures in the comments are those compiled sizes, bf16); no choice here is a GPU timing yet.
"""

from __future__ import annotations

import os

import triton

# Shared memory a CTA may use (opt-in maximum), bytes: sm_80 (A100) 163 KiB, sm_86/sm_89 99 KiB (where the DEFAULT
# lists run), sm_90 (H100/H200) 227 KiB.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 90: 232448}

GEMM_OPS = ("linear_lora_fwd", "linear_lora_bwd_dx")
MEMORY_BOUND_OPS = ("lora_shrink", "lora_bwd_dys_dyb", "lora_bwd_da")
M_BUCKETS = ("decode", "small", "large")
# Padded ranks R = max(16, next_pow2(r)) for r in 1..256: the constexpr rank tiles of the memory-bound kernels.
RANK_BLOCKS = (16, 32, 64, 128, 256)
MAX_RANK = 256
# The GEMM kernels add the LoRA term in rank chunks of this size (a 16-bit tl.dot needs K >= 16), looping over
# ceil(r / 16) chunks, so r = 256 costs no more shared memory than r = 16.
LORA_CHUNK = 16


def m_bucket(m: int) -> str:
    """decode: M <= 16 (one 16-row MMA tile; split N finely); small: M <= 128; large: training and prefill."""
    if m <= 16:
        return "decode"
    if m <= 128:
        return "small"
    return "large"


def rank_block(r: int) -> int:
    """R = max(16, next_pow2(r)): the smallest tile a 16-bit tl.dot accepts (K >= 16), padded with masked zeros."""
    return max(16, triton.next_power_of_2(r))


def _gemm(bm: int, bn: int, bk: int, group_m: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


# Shared by every capability: at M <= 16 the kernel is a weight read (docs/KERNELS.md §8); one 16-row tile, many CTAs
# along N (4096 / 32 = 128 CTAs ≈ one per SM on H100/H200/A100) and a long BLOCK_K to keep loads in flight.
_DECODE = [
    _gemm(16, 32, 256, 1, 4, 3),  # 128 CTAs at N=4096: about one per SM, each streaming 32 rows of W
    # Half the CTAs, twice the width: for large N (N=14336 -> 224 CTAs). 3 stages: with 4, B2 without dropout
    # (bf16 x, fp32 adapters) spilled 8 B on sm_90 once its mask operand became the packed bits (72 registers).
    _gemm(16, 64, 128, 1, 4, 3),
]
# 16 < M <= 128: still weight-bound; 32- and 64-row tiles avoid wasting a 128-row MMA tile.
_SMALL = [
    _gemm(32, 64, 128, 4, 4, 4),  # M ≈ 32: a 32-row tile, 2x the CTAs of a 64-row one
    _gemm(64, 128, 64, 8, 4, 3),  # M = 64-128: Triton tutorial 03's 64-row fp16 tile
]

CUDA_GEMM_CONFIGS: dict[int, dict[str, list[triton.Config]]] = {
    90: {
        "decode": _DECODE,
        "small": _SMALL,
        "large": [
            _gemm(128, 256, 64, 8, 8, 3),  # LoRAFusion's H100 tile (128, 256, 64, 8 warps) at 3 stages: 144 KiB
            _gemm(128, 128, 64, 8, 4, 4),  # Triton tutorial 03's fp16 tile; 128 KiB, 2 CTAs/SM do not fit
            _gemm(64, 256, 64, 8, 4, 4),  # narrow-M variant for N >= 4096: 160 KiB bf16, 184 KiB fp32
            _gemm(128, 128, 64, 8, 8, 3),  # B2 with dropout only (see prune_configs): 64 acc registers per thread
        ],
    },
    80: {
        "decode": _DECODE,
        "small": _SMALL,
        "large": [
            # (LoRAFusion's A100 tile 128x128x32 at 4 warps is not here: with fp32 adapters its F2 spilled 60-96 B
            # on sm_80, 16-bit and int8 W, ptxas -v in tests/kernels/test_triton_aot.py)
            _gemm(128, 256, 64, 8, 8, 3),  # large N (gate/up 14336); 96 KiB (sm_80 keeps num_stages - 1 buffers)
            _gemm(64, 128, 32, 8, 4, 4),  # LoRAFusion's RTX 3090 tile: 36 KiB, 3-4 CTAs per SM
            _gemm(128, 128, 64, 8, 8, 3),  # B2 with dropout only (see prune_configs): 64 acc registers per thread
        ],
    },
}

# Any other GPU (sm_75, sm_86, sm_89, sm_100, sm_120 until measured): <= 48 KiB of pipelined tiles per CTA.
DEFAULT_GEMM_CONFIGS: dict[str, list[triton.Config]] = {
    "decode": [_gemm(16, 64, 64, 1, 4, 3)],  # 3 stages x (16x64 + 64x64) x 2 B = 30 KiB
    "small": [_gemm(64, 64, 64, 4, 4, 3)],  # 48 KiB
    "large": [_gemm(128, 128, 32, 8, 4, 3)],  # 48 KiB; the A100 tile at 3 stages
}


# B2 with dropout drew its keep mask (inline Philox, before the packed mask of dropout.py) over the whole fp32 LoRA
# tile before the K loop. With 128 fp32 accumulator registers per thread (128x256 w8, 128x128 w4, 64x256 w4) ptxas
# then spilled 0.8-2 KB in that prologue (sm_80 and sm_90, 16-bit and int8 W, ptxas -v), so with dropout B2
# autotunes only over configs holding at most 64 per thread; (128, 128, 64) with 8 warps is in the large lists for
# that case only (0 spills) and is pruned everywhere else. Not yet re-measured with the packed mask, whose prologue
# is a few words per row.
DROPOUT_MAX_ACC_REGS = 64
_DROPOUT_ONLY = {(128, 128, 8)}  # (BLOCK_M, BLOCK_N, num_warps)


def acc_regs_per_thread(config: triton.Config) -> int:
    """fp32 accumulator registers per thread of a GEMM config: BLOCK_M·BLOCK_N / (32·num_warps)."""
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] // (32 * config.num_warps)


# int8 weights (IS_INT8) run their base GEMM transposed (the W tile is wgmma's register operand): with the 64x256
# tile and 4 warps that is a [256, 64] accumulator plus the converted W tile in registers, and ptxas spilled 96 B
# (F2, sm_90), so int8 launches do not try it.
# On sm_80 the 128x256 8-warp tile spilled 68 B in int8 F2 the same way (fp32 adapters), so int8 skips it too.
_INT8_EXCLUDED = {(64, 256, 4), (128, 256, 8)}
# B2's 16x64 4-warp decode tile spilled 8 B with dropout on sm_80 (the mask of a 128-deep K tile); with dropout the
# 16x32 decode tile serves instead.
_DROPOUT_EXCLUDED = {(16, 64, 4)}


def pickable(config: triton.Config, dropout: bool, int8: bool = False) -> bool:
    """Whether the autotuner may try ``config`` for a launch with (B2) or without dropout, with a 16-bit or an int8
    weight (prune_configs' rule)."""
    if int8 and (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps) in _INT8_EXCLUDED:
        return False
    if dropout:
        shape = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps)
        return acc_regs_per_thread(config) <= DROPOUT_MAX_ACC_REGS and shape not in _DROPOUT_EXCLUDED
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps) not in _DROPOUT_ONLY


def prune_configs(configs, named_args, **kwargs):
    """Triton autotuner ``early_config_prune``: the configs ``pickable`` for this launch's HAS_DROPOUT (B2's
    constexpr; F2 has none) and IS_INT8. A list with none pickable (the untuned DEFAULT lists) is kept whole."""
    dropout = bool(kwargs.get("HAS_DROPOUT", named_args.get("HAS_DROPOUT", False)))
    int8 = bool(kwargs.get("IS_INT8", named_args.get("IS_INT8", False)))
    return [c for c in configs if pickable(c, dropout, int8)] or configs


def for_element_size(configs: list[triton.Config], elem_bytes: int) -> list[triton.Config]:
    """fp32 operands: halve BLOCK_K so that each pipeline stage holds the same bytes as with 16-bit ones."""
    if elem_bytes <= 2:
        return configs
    out = []
    for c in configs:
        kw = dict(c.kwargs)
        kw["BLOCK_K"] = max(16, kw["BLOCK_K"] // 2)
        out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


# Test-only switch: PEFT_KERNELS_AUTOTUNE=first autotunes over each list's first config only (one compile per
# kernel variant instead of two or three), so a correctness pass on a GPU (benchmarks/gpu_suite.sh) fits its budget.
# Never set it for timings. Read when a list is first built (the launcher caches the autotuned kernel).
AUTOTUNE_ENV = "PEFT_KERNELS_AUTOTUNE"


def _maybe_first(configs: list[triton.Config]) -> list[triton.Config]:
    return configs[:1] if os.environ.get(AUTOTUNE_ENV, "").lower() == "first" else configs


def cuda_configs(op: str, capability: tuple[int, int] | None, elem_bytes: int, bucket: str) -> list[triton.Config]:
    """Autotune list of a GEMM-shaped op on an NVIDIA GPU of ``capability`` (major, minor); defaults otherwise."""
    if op not in GEMM_OPS:
        raise ValueError(f"{op!r} is not autotuned; expected one of {GEMM_OPS}")
    table = CUDA_GEMM_CONFIGS.get(capability[0] * 10 + capability[1] if capability else -1, DEFAULT_GEMM_CONFIGS)
    return _maybe_first(for_element_size(table[bucket], elem_bytes))


def hip_configs(op: str, elem_bytes: int, bucket: str) -> list[triton.Config]:
    """AMD (docs/KERNELS.md §10.10): the defaults, whose 4-8 warps and <= 2**14-element blocks fit a 64-lane wavefront."""
    if op not in GEMM_OPS:
        raise ValueError(f"{op!r} is not autotuned; expected one of {GEMM_OPS}")
    return _maybe_first(for_element_size(DEFAULT_GEMM_CONFIGS[bucket], elem_bytes))


def _cfg(warps: int, stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


# Memory-bound kernels, per padded rank R. Larger R means a wider fp32 accumulator per row ([BLOCK_M, R] registers),
# so BLOCK_M shrinks as R grows to keep it near 64 registers per thread with 4 warps.
# F1 S = x̂·Aᵀ: each CTA streams BLOCK_M rows of x through the K loop (split-K when M is small).
SHRINK_CONFIGS: dict[int, triton.Config] = {
    16: _cfg(4, 3, BLOCK_M=64, BLOCK_K=64),  # 8 KiB of x per stage; M=8192 -> 128 CTAs before split-K
    32: _cfg(4, 3, BLOCK_M=64, BLOCK_K=64),
    # 32 rows: with 64, fp32 adapters (A split hi/lo) and dropout ptxas used 255 registers and spilled 32 B on sm_80
    64: _cfg(4, 3, BLOCK_M=32, BLOCK_K=64),
    # 8 warps: with 4, fp32 adapters (A split hi/lo) and dropout ptxas spilled 8-16 B (sm_90, ptxas -v)
    128: _cfg(8, 3, BLOCK_M=32, BLOCK_K=64),
    256: _cfg(8, 3, BLOCK_M=32, BLOCK_K=32),  # A tile 32x256 per stage; 8 warps for the 32x256 accumulator
}
# B1 dS = s·dY·B, dB = s·dYᵀ·S: each CTA holds BLOCK_M rows of S and dS and streams its share of dY's columns.
DYS_DYB_CONFIGS: dict[int, triton.Config] = {
    16: _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),  # dY tile 8 KiB bf16; dB partial 64x16 per step
    32: _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
    # 8 warps from R = 64: with 4, fp32 adapters (B and S split hi/lo, two products per dY tile) spilled 72-848 B
    # (ptxas -v, sm_80 and sm_90)
    64: _cfg(8, 3, BLOCK_M=64, BLOCK_N=64),
    128: _cfg(8, 2, BLOCK_M=32, BLOCK_N=64),
    256: _cfg(8, 2, BLOCK_M=32, BLOCK_N=32),  # B tile 32x256 and S 32x256 fp32 resident
}
# B3 dA = dSᵀ·x̂: each CTA owns BLOCK_K columns of dA ([R, BLOCK_K] accumulator) and streams rows of x and dS.
DA_CONFIGS: dict[int, triton.Config] = {
    16: _cfg(4, 3, BLOCK_M=64, BLOCK_K=64),
    32: _cfg(4, 3, BLOCK_M=64, BLOCK_K=64),
    64: _cfg(4, 3, BLOCK_M=64, BLOCK_K=64),
    128: _cfg(4, 3, BLOCK_M=32, BLOCK_K=64),
    256: _cfg(8, 2, BLOCK_M=32, BLOCK_K=32),
}
# B1's dB partials (one [BLOCK_N, R] product per row block and N tile) add atomically into this many fp32 slots of
# (N, R), summed by torch afterwards: at M = 8192 (128 row blocks of 64) 8-way contention per address instead of
# 128-way, for a 16·N·R·4 B workspace (4 MiB at N = 4096, R = 16).
DB_ATOMIC_SLOTS = 16
MEMORY_BOUND_CONFIGS = {"lora_shrink": SHRINK_CONFIGS, "lora_bwd_dys_dyb": DYS_DYB_CONFIGS, "lora_bwd_da": DA_CONFIGS}


def heuristic_config(op: str, rank_block_: int) -> triton.Config:
    """The config of a memory-bound op for padded rank ``rank_block_`` (same on every NVIDIA GPU and every M).

    No separate decode tile: at M <= 16 these kernels are bound by reading A, B or dY and split their long axis
    across CTAs (launcher), so the rows a 64-row tile wastes cost registers, not bytes.
    """
    return MEMORY_BOUND_CONFIGS[op][rank_block_]


# Under TRITON_INTERPRET=1 (CPU, numpy): small tiles so that the awkward test shapes (K = 33, N = 130, M = 17) hit
# every edge mask, and few enough programs that a test stays within seconds. Tests may swap entries to check that
# the result (the dropout mask in particular) does not depend on the tiling.
INTERPRET_CONFIGS: dict[str, triton.Config] = {
    "lora_shrink": _cfg(1, 1, BLOCK_M=16, BLOCK_K=32),
    "linear_lora_fwd": _gemm(16, 32, 32, 2, 1, 1),
    "lora_bwd_dys_dyb": _cfg(1, 1, BLOCK_M=16, BLOCK_N=32),
    "linear_lora_bwd_dx": _gemm(16, 32, 32, 2, 1, 1),
    "lora_bwd_da": _cfg(1, 1, BLOCK_M=16, BLOCK_K=32),
}
# SM count the launchers assume under the interpreter: small, so that tiny test shapes still take the split
# (atomic or workspace) reduction paths.
INTERPRET_NUM_SMS = 2
