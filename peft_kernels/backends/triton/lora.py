"""Fused LoRA linear in Triton: the launchers ``lora_linear_fwd`` / ``lora_linear_bwd`` of
``backends/reference/lora.py`` (the spec) and their capability check ``not_supported_reasons``.

The kernels F1, F2 (forward) and B1, B2, B3 (backward), their math, bytes and numerics are in ``lora_kernels.py``;
device, tile-configuration and reduction-buffer plumbing in ``_launch.py``. Here: the kernel order of each
direction, buffers, grids and the arguments of each launch. ``weight_scale`` selects the int8 weight-only variant
(``lora_int8.py``).
"""

from __future__ import annotations

import torch
import triton

from .. import bind
from . import _configs, _launch, dropout, interpreting

# Re-exported: tests and the AOT compile read the kernels as ``lora.<name>``.
from .lora_kernels import (  # noqa: F401
    _AUTOTUNE_KEYS,
    KERNELS,
    _linear_lora_bwd_dx_kernel,
    _linear_lora_fwd_kernel,
    _lora_bwd_da_kernel,
    _lora_bwd_dys_dyb_kernel,
    _lora_shrink_kernel,
)


def _gemm_launcher(op: str, device: torch.device, elem_bytes: int, m: int):
    """The autotuned GEMM-shaped LoRA kernel ``op`` (F2 or B2) for this device, dtype and M bucket."""
    return _launch.gemm_launcher(op, KERNELS[op], _AUTOTUNE_KEYS[op], device, elem_bytes, m)


def _common(dropout_p, seeds, x):
    """(has_dropout, bits, inv_keep): bits is the packed keep mask of x (``dropout.dropout_bits``, one mask
    kernel launch) when p > 0, else x (an unused pointer: HAS_DROPOUT=False compiles its loads away)."""
    p = float(dropout_p[0])
    has_dropout = p > 0.0
    bits = dropout.dropout_bits(seeds[:1], x.shape[0], x.shape[1], p) if has_dropout else x
    inv_keep = 1.0 / (1.0 - p) if has_dropout else 1.0
    return has_dropout, bits, inv_keep


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _shrink(x, a, has_dropout, bits, inv_keep, prec, upcast) -> torch.Tensor:
    """F1: S = (m ⊙ x)·Aᵀ/(1-p), (M, r) fp32."""
    M, K = x.shape
    r = a.shape[0]
    rank_block = _configs.rank_block(r)
    cfg = _launch.memory_bound_config("lora_shrink", rank_block, x.device)
    block_m, block_k = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
    m_blocks = triton.cdiv(M, block_m)
    splits, per = _launch.splits(m_blocks, triton.cdiv(K, block_k), _launch.num_sms(x.device))
    buf, stride_split, atomic = _launch.reduction_buffer(splits, (M, r), x.device)
    _lora_shrink_kernel[(m_blocks, splits)](
        x, a, buf, bits,
        M, K, r, per, inv_keep,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), stride_split, buf.stride(-2), buf.stride(-1),
        bits.stride(0),
        BLOCK_R=rank_block, HAS_DROPOUT=has_dropout, ATOMIC=atomic, PREC=prec, UPCAST=upcast,
        enable_fp_fusion=_launch.FP_FUSION, **cfg.all_kwargs(),
    )  # fmt: skip
    return _launch.finish_reduction(buf, 2)


def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    lora_b_bias: list[torch.Tensor | None],
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor | None,
    weight_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y = x·Wᵀ + b + s·((m ⊙ x)·Aᵀ/(1-p)·Bᵀ + b_B); returns (y, [S]) as the reference does (one adapter).
    Keeps no dropout mask: the backward redraws it from the seed.

    Args:
        x: (M, K) any strides.  weight: (N, K) any strides.  bias: (N,) or None.
        lora_a: [(r, K)].  lora_b: [(N, r)].  lora_b_bias: [(N,) or None].  scaling, dropout_p: [float].
        seeds: int64 (1,) when p > 0.
        weight_scale: None for a float weight of x's dtype; an int8 weight's fp32 per-row scale (N,) otherwise
            (F2 with IS_INT8, see ``lora_int8.py``).
    Kernels: with p > 0 the mask kernel (``dropout.dropout_bits``), then F1 (S, fp32) and F2 (y in x's dtype, one
    fp32 accumulator). The call must pass
    ``not_supported_reasons`` (the dispatcher's choice); it is not checked again here.
    """
    a, b, b_bias, s = lora_a[0], lora_b[0], lora_b_bias[0], float(scaling[0])
    M, K = x.shape
    N, r = weight.shape[0], a.shape[0]
    prec, upcast = _launch.fp32_precision(), interpreting()
    with _launch.device_guard(x):
        has_dropout, bits, inv_keep = _common(dropout_p, seeds, x)
        shrink = _shrink(x, a, has_dropout, bits, inv_keep, prec, upcast)
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        kernel = _gemm_launcher("linear_lora_fwd", x.device, x.element_size(), M)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        bias_arg = bias if bias is not None else y
        bb_arg = b_bias if b_bias is not None else y
        ws_arg = weight_scale if weight_scale is not None else y  # unused pointer unless IS_INT8
        kernel[grid](
            x, weight, ws_arg, bias_arg, shrink, b, bb_arg, y,
            M, N, K, r, s,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), ws_arg.stride(0), bias_arg.stride(0),
            shrink.stride(0), shrink.stride(1), b.stride(0), b.stride(1), bb_arg.stride(0), y.stride(0), y.stride(1),
            LORA_CHUNK=_configs.LORA_CHUNK, HAS_BIAS=bias is not None, HAS_LORA_BIAS=b_bias is not None,
            IS_INT8=weight_scale is not None, PREC=prec, UPCAST=upcast, enable_fp_fusion=_launch.FP_FUSION,
        )  # fmt: skip
    return y, [shrink]


def lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    saved_s: list[torch.Tensor],
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor | None,
    output_mask: list[bool],
    weight_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
    """(dx, [dA], [dB]) of lora_linear_fwd (one adapter); what output_mask excludes is neither computed nor returned.

    Args:
        dy: (M, N).  x, weight, lora_a, lora_b, scaling, dropout_p, seeds, weight_scale: as in the forward.
        saved_s: [S], (M, r) fp32 from the forward.  output_mask: [need dx, need dA and dB].
    Kernels: with p > 0 the mask kernel (the forward's bits, redrawn from the seed), B1 (dS, and dB when needed),
    then B2 (dx; the only one that reads the weight) and B3 (dA). dx in x's
    dtype; dA, dB in the adapters'. Not checked again here (see the forward).
    """
    return backward(dy, x, weight, weight_scale, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, output_mask)


def backward(
    dy, x, weight, weight_scale, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, output_mask, dx_launch=None
):
    """The body of ``lora_linear_bwd``: B1 + B2 + B3. Only B2 reads the weight; ``dx_launch`` (lora_4bit.py)
    replaces B2 for a weight format of its own (arguments already checked by the caller's capability check)."""
    need_dx, need_adapters = bool(output_mask[0]), bool(output_mask[1])
    if not (need_dx or need_adapters):
        return None, [], []
    a, b, shrink, s = lora_a[0], lora_b[0], saved_s[0], float(scaling[0])
    M, K = x.shape
    N, r = weight.shape[0], a.shape[0]
    prec, upcast = _launch.fp32_precision(), interpreting()
    rank_block = _configs.rank_block(r)
    num_sms = _launch.num_sms(x.device)
    dx, d_a, d_b = None, [], []
    with _launch.device_guard(x):
        has_dropout, bits, inv_keep = _common(dropout_p, seeds, x)
        # ---- B1: dS (always: B2 and B3 need it) and dB, from one read of dY
        cfg = _launch.memory_bound_config("lora_bwd_dys_dyb", rank_block, x.device)
        block_m, block_n = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        m_blocks = triton.cdiv(M, block_m)
        splits_n, per_n = _launch.splits(m_blocks, triton.cdiv(N, block_n), num_sms)
        ds_buf, stride_dss, atomic_ds = _launch.reduction_buffer(splits_n, (M, r), x.device)
        if not need_adapters:
            db_buf, stride_dbs, atomic_db, db_slots = ds_buf, 0, False, 1  # unused pointer (NEED_DB=False)
        elif m_blocks > 1 and not torch.are_deterministic_algorithms_enabled():
            # two levels: atomics into a few (N, r) slots (row block i into slot i % slots), then one torch sum
            db_slots = min(m_blocks, _configs.DB_ATOMIC_SLOTS)
            db_buf = torch.zeros((db_slots, N, r), dtype=torch.float32, device=x.device)
            stride_dbs, atomic_db = db_buf.stride(0), True
        else:  # one row block (plain stores), or the deterministic workspace (one slot per row block)
            db_buf, stride_dbs, atomic_db = _launch.reduction_buffer(m_blocks, (N, r), x.device)
            db_slots = m_blocks if stride_dbs else 1
        _lora_bwd_dys_dyb_kernel[(m_blocks, splits_n)](
            dy, b, shrink, ds_buf, db_buf,
            M, N, r, per_n, db_slots, s,
            dy.stride(0), dy.stride(1), b.stride(0), b.stride(1), shrink.stride(0), shrink.stride(1),
            stride_dss, ds_buf.stride(-2), stride_dbs, db_buf.stride(-2),
            BLOCK_R=rank_block, NEED_DB=need_adapters, ATOMIC_DS=atomic_ds, ATOMIC_DB=atomic_db,
            PREC=prec, UPCAST=upcast, enable_fp_fusion=_launch.FP_FUSION, **cfg.all_kwargs(),
        )  # fmt: skip
        d_shrink = _launch.finish_reduction(ds_buf, 2)

        # ---- B2: dx = dY·W + m ⊙ (dS·A)/(1-p)
        if need_dx and dx_launch is not None:
            dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
            dx_launch(dy, d_shrink, a, bits, inv_keep, has_dropout, dx, prec, upcast)
        elif need_dx:
            dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
            kernel = _gemm_launcher("linear_lora_bwd_dx", x.device, dy.element_size(), M)
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)
            ws_arg = weight_scale if weight_scale is not None else dx  # unused pointer unless IS_INT8
            kernel[grid](
                dy, weight, ws_arg, d_shrink, a, bits, dx,
                M, N, K, r, inv_keep,
                dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), ws_arg.stride(0), d_shrink.stride(0),
                d_shrink.stride(1), a.stride(0), a.stride(1), dx.stride(0), dx.stride(1), bits.stride(0),
                LORA_CHUNK=_configs.LORA_CHUNK, HAS_DROPOUT=has_dropout, IS_INT8=weight_scale is not None,
                PREC=prec, UPCAST=upcast, enable_fp_fusion=_launch.FP_FUSION,
            )  # fmt: skip

        # ---- B3: dA = dSᵀ·x̂
        if need_adapters:
            cfg = _launch.memory_bound_config("lora_bwd_da", rank_block, x.device)
            block_m, block_k = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
            k_blocks = triton.cdiv(K, block_k)
            splits_m, per_m = _launch.splits(k_blocks, triton.cdiv(M, block_m), num_sms)
            da_buf, stride_das, atomic_da = _launch.reduction_buffer(splits_m, (r, K), x.device)
            _lora_bwd_da_kernel[(k_blocks, splits_m)](
                x, d_shrink, bits, da_buf,
                M, K, r, per_m, inv_keep,
                x.stride(0), x.stride(1), d_shrink.stride(0), d_shrink.stride(1), stride_das, da_buf.stride(-2),
                bits.stride(0),
                BLOCK_R=rank_block, HAS_DROPOUT=has_dropout, ATOMIC=atomic_da, PREC=prec, UPCAST=upcast,
                enable_fp_fusion=_launch.FP_FUSION, **cfg.all_kwargs(),
            )  # fmt: skip
            d_a = [_launch.finish_reduction(da_buf, 2).to(a.dtype)]
            d_b = [_launch.finish_reduction(db_buf, 2).to(b.dtype)]
    return dx, d_a, d_b


# ---------------------------------------------------------------------------------------------------------------
# Capability
# ---------------------------------------------------------------------------------------------------------------


def not_supported_reasons(op_name: str, *args) -> list[str]:
    """Every reason this backend cannot run this call of ``lora_linear_fwd`` / ``lora_linear_bwd`` (empty: it can);
    ``args`` in the op's schema order (``backends/__init__.py``), trailing defaults optional."""
    call = bind(op_name, args)
    if op_name == "lora_linear_fwd":
        return call_reasons(None, call.x, call.weight, call.weight_scale, call.bias, call.lora_a, call.lora_b,
                            call.lora_b_bias, [], call.dropout_p, call.seeds)  # fmt: skip
    return call_reasons(call.dy, call.x, call.weight, call.weight_scale, None, call.lora_a, call.lora_b, [],
                        call.saved_s, call.dropout_p, call.seeds)  # fmt: skip


def call_reasons(dy, x, weight, weight_scale, bias, lora_a, lora_b, lora_b_bias, saved_s, dropout_p, seeds):
    """The checks of ``not_supported_reasons``, one list for both directions (dy None in the forward, bias None in
    the backward). ``weight_scale`` None: a float weight of x's dtype; else an int8 weight with an fp32 per-row
    scale of shape (N,)."""
    reasons: list[str] = []
    n = len(lora_a)
    if n != 1:
        reasons.append(f"{n} active adapters (the Triton kernels take exactly one; the reference takes several)")
        return reasons
    a, b = lora_a[0], lora_b[0]
    if x.dim() != 2 or weight.dim() != 2:
        reasons.append(f"x must be 2-D and weight 2-D, got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
        return reasons
    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or K == 0 or N == 0:
        reasons.append(f"empty problem (M={M}, K={K}, N={N})")
    if x.dtype not in _launch.SUPPORTED_DTYPES:
        reasons.append(f"x.dtype={x.dtype} (supported: float32, float16, bfloat16)")
    if weight_scale is None and weight.dtype != x.dtype:
        reasons.append(f"weight.dtype={weight.dtype} differs from x.dtype={x.dtype}")
    if weight_scale is not None:
        if weight.dtype != torch.int8:
            reasons.append(f"weight_int8.dtype={weight.dtype} (expected int8)")
        if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (N,):
            reasons.append(
                f"weight_scale is {weight_scale.dtype} of shape {tuple(weight_scale.shape)} (expected float32 ({N},))"
            )
    if bias is not None and bias.dtype != x.dtype:
        reasons.append(f"bias.dtype={bias.dtype} differs from x.dtype={x.dtype}")
    if a.dtype not in (x.dtype, torch.float32):
        reasons.append(f"lora_a.dtype={a.dtype} (supported: x.dtype={x.dtype} or float32)")
    if b.dtype != a.dtype:
        reasons.append(f"lora_b.dtype={b.dtype} differs from lora_a.dtype={a.dtype}")
    if dy is not None and dy.dtype != x.dtype:
        reasons.append(f"dy.dtype={dy.dtype} differs from x.dtype={x.dtype}")
    for t in saved_s:
        if t.dtype != torch.float32:
            reasons.append(f"saved_s dtype={t.dtype} (the kernels read fp32 S)")
    for t in lora_b_bias:
        if t is not None and t.dtype not in _launch.SUPPORTED_DTYPES:
            reasons.append(f"lora_b_bias.dtype={t.dtype} (supported: float32, float16, bfloat16)")
    r = a.shape[0]
    if not 1 <= r <= _configs.MAX_RANK:
        reasons.append(f"rank r={r} outside 1..{_configs.MAX_RANK}")
    if weight.requires_grad:
        reasons.append("weight.requires_grad=True (the fused path never computes dW; the reference path does)")
    p = float(dropout_p[0])
    if not 0.0 <= p < 1.0:
        reasons.append(f"dropout_p={p} outside [0, 1)")
    if p > 0.0 and (seeds is None or seeds.dtype != torch.int64 or seeds.numel() < 1):
        reasons.append(f"dropout_p={p} needs an int64 seeds tensor, got {None if seeds is None else seeds.dtype}")
    tensors = [t for t in (dy, x, weight, weight_scale, bias, a, b, seeds, *saved_s, *lora_b_bias) if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        reasons.append(f"tensors on several devices: {sorted(str(d) for d in devices)}")
    if not interpreting():
        if x.device.type != "cuda":
            reasons.append(f"x is on {x.device} (needs a CUDA device, or TRITON_INTERPRET=1 for CPU tensors)")
        elif torch.version.hip is None:
            major, minor = _launch.capability(_launch.device_index(x.device))
            if major < 8:
                reasons.append(f"compute capability {major}.{minor} < 8.0 (bf16 and tf32 tl.dot need sm_80)")
    return reasons
