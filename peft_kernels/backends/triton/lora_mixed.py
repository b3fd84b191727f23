"""Mixed-adapter LoRA linear in Triton: ``lora_linear_mixed`` of ``backends/reference/lora_mixed.py``.

Each row m of x carries its own adapter g[m] (-1: none). The n adapters are stacked once per call, zero-padded to
the largest rank R: A* (n, R, K), B* (n, N, R), b_B* (n, N) (punica's SGMV/BGMV layout). Two kernels::

    M1 _mixed_shrink_kernel       S[m]  = x[m] · A*[g[m]]ᵀ                                 [M, R] fp32
    M2 _linear_lora_mixed_kernel  y[m]  = x[m] · Wᵀ + b + s_g·(S[m] · B*[g[m]]ᵀ + b_B*[g[m]])   [M, N]

M2 is the base GEMM with every row's own low-rank expand fused in: one fp32 accumulator per y tile, y written
once. Neither kernel gathers a per-adapter sub-batch: a tile of rows loops over the adapters and skips any that
none of its rows uses (a runtime branch on the tile's row-adapter ids), and masks the rows of other adapters out
of each dot. Decode batches (rows of different requests interleaved) touch every adapter's B once per tile;
prefill tiles, whose rows come from one or two requests, run one or two expands. The cost beyond the base GEMM:
M1 reads x once more and each used A once per row tile; M2 reads each used B chunk once per tile.

Numerics as ``lora.py`` (whose device helpers this file reuses): fp32 accumulation, split-operand dots for fp32
adapters on 16-bit activations, the interpreter's fp32 detour for 16-bit dots.
"""

from __future__ import annotations

import collections
import functools
import weakref

import torch
import triton
import triton.language as tl

from . import _configs, interpreting
from ._device_helpers import _dot_acc, _tile_ids
from ._launch import FP_FUSION as _FP_FUSION
from ._launch import SUPPORTED_DTYPES as _SUPPORTED_DTYPES
from ._launch import capability as _capability
from ._launch import device_guard as _device_guard
from ._launch import device_index as _device_index
from ._launch import finish_reduction as _finish_reduction
from ._launch import fp32_precision as _fp32_precision
from ._launch import num_sms as _num_sms
from ._launch import reduction_buffer as _reduction_buffer
from ._launch import splits as _splits


def _cfg(warps: int, stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


# Tile configs (chosen, not yet measured on a GPU). decode: M <= 64 rows, a weight read; one 16-row MMA tile, many
# CTAs along N, long K steps. prefill: compute-bound; Triton tutorial 03's 64x128 fp16 tile, grouped for L2 reuse.
DECODE_MAX_M = 64
MIXED_FWD_CONFIGS = {
    "decode": _cfg(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
    # 8 warps: the [64, 128] fp32 accumulator plus split-operand temporaries spill at 4 (ptxas, sm_80).
    "prefill": _cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
}
# M1 keeps a [BLOCK_M, R] fp32 accumulator and streams [BLOCK_K, R] tiles of A: BLOCK_K (decode) or BLOCK_M
# (prefill) shrinks as R grows, so that a pipeline stage stays near 16 KiB and the accumulator near 64 registers.
MIXED_SHRINK_CONFIGS = {
    "decode": {
        16: _cfg(4, 3, BLOCK_M=16, BLOCK_K=128),
        32: _cfg(4, 3, BLOCK_M=16, BLOCK_K=128),
        64: _cfg(4, 3, BLOCK_M=16, BLOCK_K=128),
        128: _cfg(4, 3, BLOCK_M=16, BLOCK_K=64),
        256: _cfg(8, 3, BLOCK_M=16, BLOCK_K=32),
    },
    "prefill": {
        16: _cfg(4, 3, BLOCK_M=64, BLOCK_K=64),
        32: _cfg(4, 3, BLOCK_M=64, BLOCK_K=64),
        64: _cfg(4, 3, BLOCK_M=64, BLOCK_K=64),
        128: _cfg(8, 3, BLOCK_M=32, BLOCK_K=64),  # 4 warps spill 12 B on sm_90 (ptxas)
        256: _cfg(8, 3, BLOCK_M=32, BLOCK_K=32),
    },
}
# Under TRITON_INTERPRET=1: small tiles so that tiny test shapes cross every edge mask and tile boundary.
INTERPRET_FWD_CONFIG = _cfg(1, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
INTERPRET_SHRINK_CONFIG = _cfg(1, 1, BLOCK_M=16, BLOCK_K=32)


def bucket(m: int) -> str:
    return "decode" if m <= DECODE_MAX_M else "prefill"


# ---------------------------------------------------------------------------------------------------------------
# M1: S[m] = x[m] · A*[g[m]]ᵀ
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _mixed_shrink_kernel(
    # Pointers
    x_ptr, a_ptr, g_ptr, s_ptr,
    # Dimensions
    M, K, R, n_adapters, k_tiles_per_split,
    # Strides
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak, stride_ss, stride_sm, stride_sr,
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ATOMIC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """S[rows, :] (+)= Σ_{k in this split} x[rows, k]·A*[g[row], :, k]; grid (M blocks, K splits).

    x: (M, K); A*: (n, R, K) zero-padded; g: (M,) int32 in [-1, n); S: (splits, M, R) fp32 (stride_ss = 0 when
    the splits add atomically). Rows with g = -1 end with S = 0 (never read by M2).
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    g = tl.load(g_ptr + offs_m, mask=mask_m, other=-1)
    k_start = pid_k * k_tiles_per_split * BLOCK_K
    k_end = tl.minimum(K, k_start + k_tiles_per_split * BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for a in range(0, n_adapters):
        sel = g == a
        if tl.sum(sel.to(tl.int32), axis=0) > 0:  # skip adapters no row of this tile uses
            a_cols = a_ptr + tl.cast(a, tl.int64) * stride_an + offs_r.to(tl.int64)[None, :] * stride_ar
            for k0 in range(k_start, k_end, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < k_end
                # Rows of other adapters load as zeros: they add nothing to this adapter's dot.
                x = tl.load(
                    x_rows + offs_k.to(tl.int64)[None, :] * stride_xk, mask=sel[:, None] & mask_k[None, :], other=0.0
                )
                a_t = tl.load(  # A*[a]ᵀ tile [BLOCK_K, BLOCK_R]
                    a_cols + offs_k.to(tl.int64)[:, None] * stride_ak,
                    mask=mask_k[:, None] & mask_r[None, :],
                    other=0.0,
                )
                acc = _dot_acc(x, a_t, acc, PREC, UPCAST)
    s_ptrs = (
        s_ptr + pid_k.to(tl.int64) * stride_ss + offs_m.to(tl.int64)[:, None] * stride_sm + offs_r[None, :] * stride_sr
    )
    mask = mask_m[:, None] & mask_r[None, :]
    if ATOMIC:
        tl.atomic_add(s_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(s_ptrs, acc, mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# M2: y[m] = x[m] · Wᵀ + b + s_g · (S[m] · B*[g]ᵀ + b_B*[g])
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _linear_lora_mixed_kernel(
    # Pointers
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, bb_ptr, g_ptr, scale_ptr, rank_ptr, y_ptr,
    # Dimensions
    M, N, K, n_adapters,
    # Strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bias, stride_sm, stride_sr,
    stride_bs, stride_bn, stride_br, stride_bbs, stride_bbn, stride_ym, stride_yn,
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    LORA_CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA_BIAS: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of y: base GEMM, then each used adapter's expand on its own rows.

    x: (M, K); W: (N, K) any strides; S: (M, R) fp32 from M1; B*: (n, N, R); b_B*: (n, N); g: (M,) int32;
    scale: (n,) fp32; rank: (n,) int32 (the expand loops over r_a, not R). y: (M, N), written once.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Edge rows/columns re-read valid ones (wrapped) in the main loop; the store is masked.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    g = tl.load(g_ptr + offs_m, mask=mask_m, other=-1)

    # ---- base GEMM x·Wᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k.to(tl.int64)[:, None] * stride_wk  # Wᵀ tile [BLOCK_K, BLOCK_N]
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        w_t = tl.load(w_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
        acc = _dot_acc(x, w_t, acc, PREC, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # ---- each row's own low-rank expand: s_a·S[rows of a]·B*[a]ᵀ, adapters absent from the tile skipped
    offs_c = tl.arange(0, LORA_CHUNK)
    for a in range(0, n_adapters):
        sel = g == a
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            row_mult = tl.where(sel, tl.load(scale_ptr + a), 0.0)  # s_a on this adapter's rows, 0 elsewhere
            r_a = tl.load(rank_ptr + a)
            b_base = b_ptr + tl.cast(a, tl.int64) * stride_bs
            for r0 in range(0, r_a, LORA_CHUNK):
                rr = r0 + offs_c
                s_tile = tl.load(
                    s_ptr + rows[:, None] * stride_sm + rr[None, :] * stride_sr, mask=rr[None, :] < r_a, other=0.0
                )
                b_t = tl.load(  # B*[a]ᵀ chunk [LORA_CHUNK, BLOCK_N]
                    b_base + rr[:, None] * stride_br + cols[None, :] * stride_bn, mask=rr[:, None] < r_a, other=0.0
                )
                acc = _dot_acc(s_tile * row_mult[:, None], b_t, acc, PREC, UPCAST)
            if HAS_LORA_BIAS:
                bb = tl.load(bb_ptr + tl.cast(a, tl.int64) * stride_bbs + offs_n * stride_bbn, mask=mask_n, other=0.0)
                acc += row_mult[:, None] * bb.to(tl.float32)[None, :]

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


KERNELS = {"mixed_shrink": _mixed_shrink_kernel, "linear_lora_mixed": _linear_lora_mixed_kernel}


# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------


# Stacked copies of recent adapter sets (one per LoRA layer of a served model), so that a decode step does not
# re-stack every layer's adapters (2n copy kernels per call). An entry is used only while every source tensor is
# the same live object (weak references) at the same version (an in-place update, e.g. an optimizer step or
# load_state_dict, bumps ``_version``); anything else re-stacks.
_STACK_CACHE: collections.OrderedDict = collections.OrderedDict()
STACK_CACHE_SIZE = 512


def stacked_adapters(lora_a, lora_b, lora_b_bias):
    """``stack_adapters`` through the cache above."""
    sources = [t for t in (*lora_a, *lora_b, *lora_b_bias) if t is not None]
    key = tuple((id(t), t._version) for t in sources) + (len(lora_a),)
    entry = _STACK_CACHE.get(key)
    if entry is not None and all(ref() is t for ref, t in zip(entry[0], sources)):
        _STACK_CACHE.move_to_end(key)
        return entry[1]
    stacked = stack_adapters(lora_a, lora_b, lora_b_bias)
    # A source tensor freed drops its entry at once (no stacked copy outlives the adapters it was made from).
    _STACK_CACHE[key] = ([weakref.ref(t, lambda _, key=key: _STACK_CACHE.pop(key, None)) for t in sources], stacked)
    while len(_STACK_CACHE) > STACK_CACHE_SIZE:
        _STACK_CACHE.popitem(last=False)
    return stacked


@functools.lru_cache(maxsize=256)
def _scales(scaling: tuple, device: torch.device) -> torch.Tensor:
    """s_a as an fp32 device tensor, made once per distinct scaling tuple (no host-to-device copy per call)."""
    return torch.tensor(scaling, dtype=torch.float32).to(device)


def stack_adapters(lora_a, lora_b, lora_b_bias):
    """(A* (n, R, K), B* (n, N, R), b_B* (n, N) or None, ranks (n,) int32): zero-padded to R = max r_a."""
    n, rank_max = len(lora_a), max(a.shape[0] for a in lora_a)
    k, nn_ = lora_a[0].shape[1], lora_b[0].shape[0]
    a_stack = lora_a[0].new_zeros((n, rank_max, k))
    b_stack = lora_b[0].new_zeros((n, nn_, rank_max))
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        a_stack[i, : a.shape[0]].copy_(a)
        b_stack[i, :, : b.shape[1]].copy_(b)
    bb_stack = None
    if any(t is not None for t in lora_b_bias):
        bb_stack = lora_b[0].new_zeros((n, nn_))
        for i, t in enumerate(lora_b_bias):
            if t is not None:
                bb_stack[i].copy_(t)
    ranks = torch.tensor([a.shape[0] for a in lora_a], dtype=torch.int32).to(lora_a[0].device, non_blocking=True)
    return a_stack, b_stack, bb_stack, ranks


def _configs_for(m: int, rank_block: int, device: torch.device) -> tuple[triton.Config, triton.Config]:
    if interpreting() or device.type != "cuda":
        return INTERPRET_SHRINK_CONFIG, INTERPRET_FWD_CONFIG
    b = bucket(m)
    return MIXED_SHRINK_CONFIGS[b][rank_block], MIXED_FWD_CONFIGS[b]


def lora_linear_mixed(x, weight, bias, lora_a, lora_b, lora_b_bias, scaling, row_adapter):
    """y = x·Wᵀ + b + per-row s_g·(x·A_gᵀ·B_gᵀ + b_Bg) (reference: backends/reference/lora_mixed.py). M1 then M2."""
    reasons = not_supported_reasons("lora_linear_mixed", x, weight, bias, lora_a, lora_b, lora_b_bias, scaling,
                                    row_adapter)  # fmt: skip
    if reasons:
        raise ValueError("Triton lora_linear_mixed cannot run this call: " + "; ".join(reasons))
    M, K = x.shape
    N, n = weight.shape[0], len(lora_a)
    prec, upcast = _fp32_precision(), interpreting()
    with _device_guard(x):
        a_stack, b_stack, bb_stack, ranks = stacked_adapters(lora_a, lora_b, lora_b_bias)
        rank_max = a_stack.shape[1]
        rank_block = _configs.rank_block(rank_max)
        g = row_adapter.to(torch.int32).contiguous()
        scales = _scales(tuple(scaling), x.device)
        shrink_cfg, fwd_cfg = _configs_for(M, rank_block, x.device)
        # ---- M1
        m_blocks = triton.cdiv(M, shrink_cfg.kwargs["BLOCK_M"])
        splits, per = _splits(m_blocks, triton.cdiv(K, shrink_cfg.kwargs["BLOCK_K"]), _num_sms(x.device))
        buf, stride_split, atomic = _reduction_buffer(splits, (M, rank_max), x.device)
        _mixed_shrink_kernel[(m_blocks, splits)](
            x, a_stack, g, buf,
            M, K, rank_max, n, per,
            x.stride(0), x.stride(1), a_stack.stride(0), a_stack.stride(1), a_stack.stride(2),
            stride_split, buf.stride(-2), buf.stride(-1),
            BLOCK_R=rank_block, ATOMIC=atomic, PREC=prec, UPCAST=upcast, enable_fp_fusion=_FP_FUSION,
            **shrink_cfg.all_kwargs(),
        )  # fmt: skip
        shrink = _finish_reduction(buf, 2)
        # ---- M2
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(M, fwd_cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, fwd_cfg.kwargs["BLOCK_N"]),)
        bias_arg = bias if bias is not None else y
        bb_arg = bb_stack if bb_stack is not None else b_stack[:, :, 0]  # unused pointer unless HAS_LORA_BIAS
        _linear_lora_mixed_kernel[grid](
            x, weight, bias_arg, shrink, b_stack, bb_arg, g, scales, ranks, y,
            M, N, K, n,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), bias_arg.stride(0),
            shrink.stride(0), shrink.stride(1), b_stack.stride(0), b_stack.stride(1), b_stack.stride(2),
            bb_arg.stride(0), bb_arg.stride(1), y.stride(0), y.stride(1),
            LORA_CHUNK=_configs.LORA_CHUNK, HAS_BIAS=bias is not None, HAS_LORA_BIAS=bb_stack is not None,
            PREC=prec, UPCAST=upcast, enable_fp_fusion=_FP_FUSION, **fwd_cfg.all_kwargs(),
        )  # fmt: skip
    return y


def not_supported_reasons(op_name: str, *args) -> list[str]:
    """Every reason this backend cannot run the call (empty: it can).

    lora_linear_mixed args: (x, weight, bias, lora_a, lora_b, lora_b_bias, scaling, row_adapter).
    """
    if op_name != "lora_linear_mixed":
        return [f"no Triton kernel for {op_name}"]
    x, weight, bias, lora_a, lora_b, lora_b_bias, _scaling, row_adapter = args
    if x.dim() != 2 or weight.dim() != 2:
        return [f"x must be 2-D and weight 2-D, got x {tuple(x.shape)} and weight {tuple(weight.shape)}"]
    reasons: list[str] = []
    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or K == 0 or N == 0 or not lora_a:
        reasons.append(f"empty problem (M={M}, K={K}, N={N}, {len(lora_a)} adapters)")
    if x.dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"x.dtype={x.dtype} (supported: float32, float16, bfloat16)")
    if weight.dtype != x.dtype:
        reasons.append(f"weight.dtype={weight.dtype} differs from x.dtype={x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        reasons.append(f"bias.dtype={bias.dtype} differs from x.dtype={x.dtype}")
    adapter_dtypes = {t.dtype for t in (*lora_a, *lora_b, *(t for t in lora_b_bias if t is not None))}
    if len(adapter_dtypes) > 1 or not adapter_dtypes <= {x.dtype, torch.float32}:
        reasons.append(
            f"adapter dtypes {sorted(str(d) for d in adapter_dtypes)} (supported: all x.dtype={x.dtype} or all "
            "float32)"
        )
    for a in lora_a:
        if not 1 <= a.shape[0] <= _configs.MAX_RANK:
            reasons.append(f"rank r={a.shape[0]} outside 1..{_configs.MAX_RANK}")
    if row_adapter.dim() != 1 or row_adapter.shape[0] != M:
        reasons.append(f"row_adapter must be ({M},), got {tuple(row_adapter.shape)}")
    tensors = [x, weight, row_adapter, *lora_a, *lora_b, *(t for t in (bias, *lora_b_bias) if t is not None)]
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
