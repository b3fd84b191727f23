"""CUDA C++ ``lora_linear_fwd`` for decode shapes (M <= 16): ``_C.lora_linear_fwd_launch`` (csrc/lora.cu) for a
dense weight, ``_C.lora_linear_int8_fwd_launch`` (csrc/lora_int8.cu) for an int8 one (``formats.py``).

Same signature and semantics as ``backends/reference/lora.py``; one shrink launch (S = x·Aᵀ, fp32) and one fused
GEMV + LoRA epilogue launch. Serves at most one adapter without dropout (decode is inference); everything else
is declined by ``not_supported_reasons`` so the dispatcher moves on (Triton, then the reference). It comes first
on CUDA tensors: at M <= 16 the GEMV streams W once, which is what decode needs.
"""

from __future__ import annotations

import torch

from .. import bind
from ._launch import CHUNK_K, DTYPE, HALF_DTYPES, SMALL_M_MAX, aligned, device_reasons, launch, ptr


def small_m_reasons(x, weight, bias, lora_a, lora_b, lora_b_bias, dropout_p, weight_dtype) -> list[str]:
    """Every reason the small-M kernels cannot take this call (empty: they can). Cheap: no device sync."""
    reasons = device_reasons(
        x,
        weight=weight,
        bias=bias,
        **{f"lora_a[{i}]": t for i, t in enumerate(lora_a)},
        **{f"lora_b[{i}]": t for i, t in enumerate(lora_b)},
    )
    if reasons and reasons[0].startswith("tensors are on"):
        return reasons
    if x.dtype not in HALF_DTYPES:
        reasons.append(f"x is {x.dtype}; the decode kernels take float16/bfloat16")
    m, k = x.shape
    if not 1 <= m <= SMALL_M_MAX:
        reasons.append(f"M = {m} rows: the decode GEMV serves 1 <= M <= {SMALL_M_MAX}")
    if k % CHUNK_K:
        reasons.append(f"K = {k} is not a multiple of {CHUNK_K}")
    if x.stride(1) != 1 or x.stride(0) % 8 or not aligned(x):
        reasons.append("x rows are not dense and 16-byte aligned")
    if weight.dtype != weight_dtype:
        reasons.append(f"weight is {weight.dtype}, expected {weight_dtype}")
    row_align = 16 // weight.element_size()
    if weight.stride(1) != 1 or weight.stride(0) % row_align or not aligned(weight):
        reasons.append("weight rows are not dense and 16-byte aligned (e.g. a transposed Conv1D weight)")
    if weight.shape[0] >= 2**31:
        reasons.append(f"N = {weight.shape[0]} is too large")
    if bias is not None and (bias.dtype != x.dtype or bias.stride(0) != 1):
        reasons.append("bias must be dense and of x's dtype")
    if len(lora_a) > 1:
        reasons.append(f"{len(lora_a)} active adapters; the decode kernel fuses at most one")
    if any(p > 0.0 for p in dropout_p):
        reasons.append("dropout p > 0 (training); the decode kernel has no dropout")
    for a, b, b_bias in zip(lora_a, lora_b, lora_b_bias):
        if a.dtype not in (x.dtype, torch.float32) or b.dtype != a.dtype:
            reasons.append(f"adapters are {a.dtype}/{b.dtype}; expected both {x.dtype} or both float32")
        if a.stride(1) != 1 or a.stride(0) % (16 // a.element_size()) or not aligned(a):
            reasons.append("lora_a rows are not dense and 16-byte aligned")
        if a.shape[0] > 4096:
            reasons.append(f"r = {a.shape[0]} > 4096")
        if b_bias is not None and (b_bias.dtype != b.dtype or b_bias.stride(0) != 1 or b_bias.device != x.device):
            reasons.append("lora_b_bias must be dense, on x's device and of lora_b's dtype")
    return reasons


def run_small_m(launcher, x, weight, weight_scale, bias, lora_a, lora_b, lora_b_bias, scaling):
    """Allocates y (M, N) and S (M, r) fp32, launches shrink + fused GEMV; returns (y, [S] or [])."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    a = lora_a[0] if lora_a else None
    b = lora_b[0] if lora_b else None
    r = a.shape[0] if a is not None else 0
    s = torch.empty((m, r), dtype=torch.float32, device=x.device) if a is not None else None
    use_lora = r > 0  # r = 0: no LoRA term, plain GEMV
    scale_args = (ptr(weight_scale),) if weight_scale is not None else ()
    launch(
        launcher,
        x.device,
        # Pointers
        ptr(x),
        ptr(weight),
        *scale_args,
        ptr(bias),
        ptr(a) if use_lora else 0,
        ptr(b) if use_lora else 0,
        ptr(lora_b_bias[0]) if use_lora and lora_b_bias else 0,
        ptr(s) if use_lora else 0,
        ptr(y),
        # Dimensions
        m,
        n,
        k,
        r,
        # Strides (elements)
        x.stride(0),
        weight.stride(0),
        a.stride(0) if use_lora else 0,
        b.stride(0) if use_lora else 0,
        b.stride(1) if use_lora else 0,
        s.stride(0) if use_lora else 0,
        y.stride(0),
        # Types and scalars
        DTYPE[x.dtype],
        DTYPE[a.dtype] if use_lora else DTYPE[x.dtype],
        float(scaling[0]) if scaling else 0.0,
    )
    return y, ([s] if s is not None else [])


def not_supported_reasons(op_name: str, *args) -> list[str]:
    """Every reason the decode kernels cannot run this ``lora_linear_fwd`` call (empty: they can)."""
    call = bind(op_name, args)
    weight_dtype = call.x.dtype if call.weight_scale is None else torch.int8
    reasons = small_m_reasons(
        call.x, call.weight, call.bias, call.lora_a, call.lora_b, call.lora_b_bias, call.dropout_p, weight_dtype
    )
    if reasons and reasons[0].startswith("tensors are on"):
        return reasons
    scale = call.weight_scale
    if scale is not None and (scale.dtype != torch.float32 or scale.stride(0) != 1 or scale.device != call.x.device):
        reasons.append("weight_scale must be a dense float32 vector on x's device")
    return reasons


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
    """y = x·Wᵀ + b + s·(x·Aᵀ·Bᵀ + b_B), (M <= 16, K % 16 == 0, fp16/bf16, <= 1 adapter, p = 0); returns (y, [S]).

    W = weight, or weight · weight_scale[:, None] for an int8 weight (the int8 rows streamed once and converted in
    registers). Args as ``backends/reference/lora.lora_linear_fwd``; the call must pass ``not_supported_reasons``
    (the dispatcher's choice), it is not checked again here.
    """
    from . import extension

    ext = extension()
    launcher = ext.lora_linear_fwd_launch if weight_scale is None else ext.lora_linear_int8_fwd_launch
    return run_small_m(launcher, x, weight, weight_scale, bias, lora_a, lora_b, lora_b_bias, scaling)
