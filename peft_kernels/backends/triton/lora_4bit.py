"""Fused LoRA linear on a bitsandbytes 4-bit (NF4 / FP4) base in Triton: ``lora_linear_4bit_{fwd,bwd}`` of
``backends/reference/lora_4bit.py``.

With the packed codes P (⌈NK/2⌉ bytes), the 16-entry table c, block scales a (nested: ac[a_q]·a2[j//bs2] + off),
W[n, k] = rnd_x(c[nib(nK + k)] · a[(nK + k) // bs]) and the rest as in ``lora.py``::

    F1  lora._lora_shrink_kernel       S  = (m ⊙ x)·Aᵀ/(1-p)                          [M, r]  fp32 (lora.py's)
    F2q _linear_lora_4bit_fwd_kernel   y  = x·Wᵀ + b + s·(S·Bᵀ + b_B)                [M, N]  M > 16
    F2v _linear_lora_4bit_gemv_kernel  the same for M <= 16 (decode): one row per program, no tl.dot
    B1  lora._lora_bwd_dys_dyb_kernel  dS = s·dY·B,  dB = s·dYᵀ·S                     (lora.py's)
    B2q _linear_lora_4bit_bwd_dx_kernel dx = dY·W + m ⊙ (dS·A)/(1-p)                  W decoded in transposed order
    B3  lora._lora_bwd_da_kernel       dA = dSᵀ·(m ⊙ x)/(1-p)                          (lora.py's)

F2q, F2v and B2q decode each W tile in registers inside the main loop (``_decode_tile``: byte load, nibble shift,
table lookup, × block scale, one rounding to the activation dtype, which is bit for bit the reference's W_deq) and
never write W in any other form; the LoRA term goes into the same fp32 accumulator; dropout is the Philox mask of
``dropout.py`` (``apply_keep_bits``), packed bits. Bytes per GEMM: NK/2 for W plus NK/bs scales (nested: 1 byte each
plus NK/(bs·256)·4), against 2NK for a 16-bit W and 2NK written + 2NK read again by PEFT + bnb's dequantize-then-GEMM.
Not yet timed on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import bind
from . import interpreting, lora
from ._device_helpers import _dot_acc, _lora_term, _tile_ids
from ._launch import FP_FUSION as _FP_FUSION
from ._launch import device_guard as _device_guard
from ._launch import fp32_precision as _fp32_precision
from .dropout import apply_keep_bits

# Rows of x up to which the forward takes the GEMV kernel (a 16-bit tl.dot needs 16 rows anyway).
GEMV_MAX_M = 16


def _cfg(warps: int, stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


# Tile lists, as data (compiled for sm_80 and sm_90 by tests/kernels/test_triton_aot.py, which also runs the ptxas
# spill gate on them). The decode adds integer work per W element, so tiles are the 16-bit lists' smaller members;
# candidates until a GPU times them. Dropped by the gates (measured there): a (128, 128, 64) 3-stage tile needs
# 240 KiB of shared memory (over both limits); fwd (128, 64, 64) w8 in 3 stages spills on sm_80 (2 stages do not);
# bwd_dx (64, 64, 64) w4 spills on sm_90 (BLOCK_K 32 does not); gemv tiles of 8192 W elements per 4 warps spill
# hundreds of bytes (4096 do not).
CONFIGS = {
    "fwd": [
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _cfg(8, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
    ],
    "bwd_dx": [
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ],
    "gemv": [_cfg(4, 2, BLOCK_N=32, BLOCK_K=128), _cfg(4, 3, BLOCK_N=16, BLOCK_K=256)],
}
INTERPRET_CONFIGS = {
    "fwd": _cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2),
    "bwd_dx": _cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2),
    "gemv": _cfg(4, 1, BLOCK_N=16, BLOCK_K=32),
}


@triton.jit
def _decode_tile(
    p_ptr, code_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, elem, valid, blocksize, nested_blocksize,
    NESTED: tl.constexpr, OUT_DTYPE: tl.constexpr,
):  # fmt: skip
    """W values at flat element indices ``elem`` (int64 tile), rounded once to OUT_DTYPE; 0 where not ``valid``.

    code[nibble] · scale in fp32 as bnb: element e is the high nibble of byte e//2 when e is even, the low one when
    odd; scale = absmax[e // blocksize], or for nested scales nested_code[absmax_u8[j]] · nested_absmax[j // bs2]
    + offset, j = e // blocksize (the same fp32 operations in the same order as the reference).
    """
    byte = tl.load(p_ptr + (elem >> 1), mask=valid, other=0).to(tl.int32)
    nib = (byte >> ((1 - (elem & 1)) * 4).to(tl.int32)) & 15
    value = tl.load(code_ptr + nib)
    block = elem // blocksize
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=valid, other=0).to(tl.int32)
        scale = tl.load(ncode_ptr + q) * tl.load(nabs_ptr + block // nested_blocksize, mask=valid, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=valid, other=0.0)
    return tl.where(valid, value * scale, 0.0).to(OUT_DTYPE)


@triton.jit
def _linear_lora_4bit_fwd_kernel(
    x_ptr, p_ptr, code_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, bias_ptr, s_ptr, b_ptr, bb_ptr, y_ptr,
    M, N, K, r, scaling, blocksize, nested_blocksize,
    stride_xm, stride_xk, stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    LORA_CHUNK: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA_BIAS: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of y: the LoRA term seeds the fp32 accumulator, then x·Wᵀ with each Wᵀ tile
    [BLOCK_K, BLOCK_N] decoded in registers. x: (M, K) any strides; the 4-bit W (N, K) row-major (bnb's order)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _lora_term(
        acc, s_ptr, b_ptr, rows, cols, r, scaling, stride_sm, stride_sr, stride_bn, stride_br, LORA_CHUNK,
        x_ptr.dtype.element_ty, PREC, UPCAST,
    )  # fmt: skip
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk, mask=kk[None, :] < K, other=0.0)
        elem = cols[None, :] * K + kk.to(tl.int64)[:, None]  # Wᵀ tile [BLOCK_K, BLOCK_N]
        w_t = _decode_tile(
            p_ptr, code_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, elem, kk[:, None] < K, blocksize,
            nested_blocksize, NESTED, x_ptr.dtype.element_ty,
        )  # fmt: skip
        acc = _dot_acc(x, w_t, acc, PREC, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA_BIAS:
        acc += scaling * tl.load(bb_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _linear_lora_4bit_gemv_kernel(
    x_ptr, p_ptr, code_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, bias_ptr, s_ptr, b_ptr, bb_ptr, y_ptr,
    N, K, r, scaling, blocksize, nested_blocksize,
    stride_xm, stride_xk, stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA_BIAS: tl.constexpr,
):  # fmt: skip
    """y[m, n-tile] for one row m (grid: N tiles × M, M <= 16): a multiply-reduce over W tiles [BLOCK_N, BLOCK_K]
    decoded in registers (each packed byte is read once per row, from L2 after the first row), the LoRA term
    Σ_r s·S[m, r]·B[n, r] added in fp32, one rounding."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    cols = (offs_n % N).to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + m * stride_xm + kk * stride_xk, mask=kk < K, other=0.0)
        elem = cols[:, None] * K + kk.to(tl.int64)[None, :]  # W tile [BLOCK_N, BLOCK_K]
        w = _decode_tile(
            p_ptr, code_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, elem, kk[None, :] < K, blocksize,
            nested_blocksize, NESTED, x_ptr.dtype.element_ty,
        )  # fmt: skip
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    lora = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(0, r):
        s_mj = tl.load(s_ptr + m * stride_sm + j * stride_sr)
        lora += s_mj * tl.load(b_ptr + cols * stride_bn + j * stride_br).to(tl.float32)
    acc += scaling * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_LORA_BIAS:
        acc += scaling * tl.load(bb_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _linear_lora_4bit_bwd_dx_kernel(
    dy_ptr, p_ptr, code_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, ds_ptr, a_ptr, bits_ptr, dx_ptr,
    M, N, K, r, inv_keep, blocksize, nested_blocksize,
    stride_dym, stride_dyn, stride_dsm, stride_dsr, stride_ar, stride_ak, stride_dxm, stride_dxk, stride_bm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    LORA_CHUNK: tl.constexpr, NESTED: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of dx (BLOCK_N along K); reduction over W's N in BLOCK_K steps with each W tile
    [BLOCK_K (n), BLOCK_N (k)] decoded in registers (W in transposed order relative to the forward). The LoRA term
    dS·A is masked with the forward's dropout mask on its own, then seeds the accumulator (as lora.py's B2)."""
    pid_m, pid_n = _tile_ids(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < K
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % K).to(tl.int64)
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_c = tl.arange(0, LORA_CHUNK)
    for r0 in range(0, r, LORA_CHUNK):
        rr = r0 + offs_c
        ds = tl.load(ds_ptr + rows[:, None] * stride_dsm + rr[None, :] * stride_dsr, mask=rr[None, :] < r, other=0.0)
        a = tl.load(a_ptr + rr[:, None] * stride_ar + cols[None, :] * stride_ak, mask=rr[:, None] < r, other=0.0)
        lora = _dot_acc(ds, a, lora, PREC, UPCAST)
    if HAS_DROPOUT:
        lora = apply_keep_bits(lora * inv_keep, bits_ptr, stride_bm, rows, pid_n * BLOCK_N, mask_m, (K + 31) // 32)
    acc = lora
    offs_k = tl.arange(0, BLOCK_K)
    for n0 in range(0, N, BLOCK_K):
        nn = n0 + offs_k
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + nn[None, :] * stride_dyn, mask=nn[None, :] < N, other=0.0)
        elem = nn.to(tl.int64)[:, None] * K + cols[None, :]  # W tile [BLOCK_K (n), BLOCK_N (k)]
        w = _decode_tile(
            p_ptr, code_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, elem, nn[:, None] < N, blocksize,
            nested_blocksize, NESTED, dy_ptr.dtype.element_ty,
        )  # fmt: skip
        acc = _dot_acc(dy, w, acc, PREC, UPCAST)
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_n[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


KERNELS = {
    "fwd": _linear_lora_4bit_fwd_kernel,
    "gemv": _linear_lora_4bit_gemv_kernel,
    "bwd_dx": _linear_lora_4bit_bwd_dx_kernel,
}
_AUTOTUNE_KEYS = {"fwd": ["N", "K", "NESTED"], "gemv": ["N", "K", "NESTED"], "bwd_dx": ["N", "K", "HAS_DROPOUT"]}
_autotuned: dict[str, object] = {}


def _launcher(kind: str, device: torch.device):
    """Autotuned kernel on a GPU; under the interpreter a one-config autotuner (no benchmarking)."""
    if interpreting() or device.type != "cuda":
        return triton.autotune(configs=[INTERPRET_CONFIGS[kind]], key=_AUTOTUNE_KEYS[kind])(KERNELS[kind])
    if kind not in _autotuned:
        _autotuned[kind] = triton.autotune(configs=CONFIGS[kind], key=_AUTOTUNE_KEYS[kind])(KERNELS[kind])
    return _autotuned[kind]


def _quant_args(packed, absmax, nested_absmax, nested_code, offset, code):
    """Kernel pointer arguments: bytes, fp32 table, scales (uint8 + nested when nested); unused pointers → code."""
    nested = nested_absmax is not None
    p = packed.reshape(-1).view(torch.uint8)
    absmax_arg = absmax.reshape(-1).view(torch.uint8) if nested else absmax.to(torch.float32)
    nabs = nested_absmax.to(torch.float32) if nested else code
    ncode = nested_code.to(torch.float32) if nested else code
    off = offset.reshape(1).to(torch.float32) if nested else code
    return (p, code.to(torch.float32), absmax_arg, nabs, ncode, off), nested


def lora_linear_4bit_fwd(
    x, packed, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, shape,
    bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds,
):  # fmt: skip
    """y = x·W_deqᵀ + b + s·((m ⊙ x)·Aᵀ/(1-p)·Bᵀ + b_B); returns (y, [S]) (one adapter). Arguments as the reference
    (keeps no dropout mask: the backward regenerates it). Kernels: F1 (lora.py) then F2v
    (M <= 16) or F2q. Not checked again here (``not_supported_reasons``)."""
    a, b, b_bias, s = lora_a[0], lora_b[0], lora_b_bias[0], float(scaling[0])
    M, K = x.shape
    N, r = int(shape[0]), a.shape[0]
    prec, upcast = _fp32_precision(), interpreting()
    quant, nested = _quant_args(packed, absmax, nested_absmax, nested_code, offset, code)
    with _device_guard(x):
        has_dropout, bits, inv_keep = lora._common(dropout_p, seeds, x)
        shrink = lora._shrink(x, a, has_dropout, bits, inv_keep, prec, upcast)
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        bias_arg = bias if bias is not None else y
        bb_arg = b_bias if b_bias is not None else y
        flags = dict(NESTED=nested, HAS_BIAS=bias is not None, HAS_LORA_BIAS=b_bias is not None)
        strides = (x.stride(0), x.stride(1), shrink.stride(0), shrink.stride(1), b.stride(0), b.stride(1),
                   y.stride(0), y.stride(1))  # fmt: skip
        if M <= GEMV_MAX_M:
            kernel = _launcher("gemv", x.device)
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)
            kernel[grid](x, *quant, bias_arg, shrink, b, bb_arg, y, N, K, r, s, int(blocksize), int(nested_blocksize),
                         *strides, **flags, enable_fp_fusion=_FP_FUSION)  # fmt: skip
        else:
            kernel = _launcher("fwd", x.device)
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
            kernel[grid](x, *quant, bias_arg, shrink, b, bb_arg, y, M, N, K, r, s, int(blocksize),
                         int(nested_blocksize), *strides, LORA_CHUNK=lora._configs.LORA_CHUNK, PREC=prec,
                         UPCAST=upcast, **flags, enable_fp_fusion=_FP_FUSION)  # fmt: skip
    return y, [shrink]


def _dx_4bit(quant, nested, blocksize, nested_blocksize, n_rows):
    """B2 replacement for ``lora.backward``: a callable (dy, d_shrink, a, bits, inv_keep, has_dropout, dx, ...)."""

    def launch(dy, d_shrink, a, bits, inv_keep, has_dropout, dx, prec, upcast):
        M, K = dx.shape
        kernel = _launcher("bwd_dx", dx.device)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)
        kernel[grid](dy, *quant, d_shrink, a, bits, dx, M, n_rows, K, a.shape[0], inv_keep, int(blocksize),
                     int(nested_blocksize), dy.stride(0), dy.stride(1), d_shrink.stride(0), d_shrink.stride(1),
                     a.stride(0), a.stride(1), dx.stride(0), dx.stride(1), bits.stride(0), LORA_CHUNK=lora._configs.LORA_CHUNK,
                     NESTED=nested, HAS_DROPOUT=has_dropout, PREC=prec, UPCAST=upcast,
                     enable_fp_fusion=_FP_FUSION)  # fmt: skip

    return launch


def lora_linear_4bit_bwd(
    dy, x, packed, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, shape,
    lora_a, lora_b, saved_s, scaling, dropout_p, seeds, output_mask,
):  # fmt: skip
    """(dx, [dA], [dB]) of lora_linear_4bit_fwd (one adapter): lora.py's B1 and B3, and B2q for dx (W decoded in
    registers), only what output_mask asks for. Arguments as the reference; not checked again here."""
    quant, nested = _quant_args(packed, absmax, nested_absmax, nested_code, offset, code)
    n_rows = int(shape[0])
    # lora.backward reads only weight.shape[0] outside B2; a (N, 0) view stands in for the 4-bit weight there.
    weight_shape_only = x.new_empty((n_rows, 0))
    return lora.backward(dy, x, weight_shape_only, None, lora_a, lora_b, saved_s, scaling, dropout_p, seeds,
                         output_mask, dx_launch=_dx_4bit(quant, nested, blocksize, nested_blocksize, n_rows))  # fmt: skip


def not_supported_reasons(op_name: str, *args) -> list[str]:
    """Every reason this backend cannot run ``op_name`` on these arguments (empty: it can): ``lora.call_reasons``
    on the activations and adapters (the weight stood in by an (N, K) meta tensor of x's dtype) plus the format."""
    call = bind(op_name, args)
    if op_name == "lora_linear_4bit_fwd":
        dy, bias, lora_b_bias, saved_s = None, call.bias, call.lora_b_bias, []
    else:
        dy, bias, lora_b_bias, saved_s = call.dy, None, [], call.saved_s
    x = call.x
    weight = torch.empty(tuple(int(s) for s in call.shape), dtype=x.dtype, device="meta")
    reasons = lora.call_reasons(dy, x, weight, None, bias, call.lora_a, call.lora_b, lora_b_bias, saved_s,
                                call.dropout_p, call.seeds)  # fmt: skip
    reasons = [r for r in reasons if "several devices" not in r]
    quant = (call.packed, call.absmax, call.nested_absmax, call.code)
    devices = {t.device for t in (x, *quant, *call.lora_a, *call.lora_b) if t is not None}
    if len(devices) > 1:
        reasons.append(f"tensors on several devices: {sorted(str(d) for d in devices)}")
    if int(call.blocksize) % 2:
        reasons.append(f"blocksize={call.blocksize} is odd")
    return reasons
