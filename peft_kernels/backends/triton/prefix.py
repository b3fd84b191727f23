"""Triton prefix key/value kernels: ``prefix_kv_fill``, ``kv_append``, ``prefix_kv_fill_bwd``.

Same signatures and semantics as ``backends/reference/prefix.py`` (the spec), bitwise: the writes are copies, and
the gradient adds the batch rows in the order b = 0, 1, …, B-1 in fp32 from zero and rounds once, as the reference
does. Shapes: prefix [L, 2, Hkv, P, hd]; buffers / their gradients [B, Hkv, S, hd]; new k, v [B, Hkv, T, hd]; any
strides (zero strides of expanded gradients included); fp32, fp16, bf16.

Kernels (memory-bound copies, no tl.dot; tiles of about ``_TILE_ELEMENTS`` elements, no autotuning):

    _prefix_kv_fill_kernel      grid (L·Hkv, ⌈P/BLOCK_R⌉, ⌈hd/BLOCK_D⌉): loads a prefix tile of keys and of values
                                once and stores it into the B batch rows of K_l and V_l
                                (reads 2·L·Hkv·P·hd elements, writes B times that)
    _kv_append_kernel           grid (B·Hkv, ⌈T/BLOCK_R⌉, ⌈hd/BLOCK_D⌉): K[b, h, offset+t] = k[b, h, t], same for V
                                (reads and writes 2·B·Hkv·T·hd elements)
    _prefix_kv_fill_bwd_kernel  grid (L·Hkv, ⌈P/BLOCK_R⌉, ⌈hd/BLOCK_D⌉): out[l, 0|1, h] = Σ_b dK_l|dV_l[b, h, :P]
                                in fp32 (reads 2·L·B·Hkv·P·hd, writes 2·L·Hkv·P·hd elements; no stacked temporary)

Layers in one launch: a list of per-layer tensors is addressed as ``base + l · stride_layer`` when the tensors are
views of one allocation at equal distances with equal shapes and strides (``PrefixKVCache`` allocates its buffers
so: one launch fills every layer). Otherwise (separate allocations, e.g. autograd's gradient tensors) the launcher
issues one launch per layer, each covering K and V: a device-side pointer table would need a host-to-device copy
per call, which rules out CUDA graphs (docs/KERNELS.md §10.4).

All offsets are int64 (a [B, Hkv, S, hd] buffer passes 2³¹ elements at, e.g., B=64, Hkv=8, S=32k, hd=128).
Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch, interpreting

# Elements per tile: 2048 × 4 B = 8 KiB per loaded tile, 16 per thread at 4 warps (4-wide 16-byte vectors of fp32,
# 8-wide of 16-bit along hd); the fill stores one loaded tile B times, the gradient keeps two fp32 accumulators.
_TILE_ELEMENTS = 2048
_MAX_BLOCK_D = 256
_MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y / gridDim.z


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _prefix_kv_fill_kernel(
    # Pointers
    prefix_ptr,
    k_ptr,
    v_ptr,
    # Dimensions
    B,
    H,
    P,
    D,
    # Strides (elements): prefix [L, 2, H, P, D]; K_l / V_l [B, H, S, D] at k_ptr + l·stride_kl / v_ptr + l·stride_vl
    stride_pl,
    stride_pkv,
    stride_ph,
    stride_pp,
    stride_pd,
    stride_kl,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vl,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    # Meta-parameters
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_lh = tl.program_id(0).to(tl.int64)
    layer = pid_lh // H
    head = pid_lh % H
    offs_r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_r < P)[:, None] & (offs_d < D)[None, :]

    # ---- read the prefix tile once: keys prefix[layer, 0, head], values prefix[layer, 1, head]
    src = prefix_ptr + layer * stride_pl + head * stride_ph + offs_r[:, None] * stride_pp + offs_d[None, :] * stride_pd
    keys = tl.load(src, mask=mask)
    values = tl.load(src + stride_pkv, mask=mask)

    # ---- broadcast over the batch: rows 0..P-1 of K_l[b, head], V_l[b, head]
    k_dst = k_ptr + layer * stride_kl + head * stride_kh + offs_r[:, None] * stride_ks + offs_d[None, :] * stride_kd
    v_dst = v_ptr + layer * stride_vl + head * stride_vh + offs_r[:, None] * stride_vs + offs_d[None, :] * stride_vd
    for _ in range(B):
        tl.store(k_dst, keys, mask=mask)
        tl.store(v_dst, values, mask=mask)
        # Pointer increments instead of b·stride: no int32 product to overflow.
        k_dst += stride_kb
        v_dst += stride_vb


@triton.jit
def _kv_append_kernel(
    # Pointers
    k_buf_ptr,
    v_buf_ptr,
    k_ptr,
    v_ptr,
    # Dimensions
    H,
    T,
    D,
    offset,
    # Strides (elements): buffers [B, H, S, D]; new k, v [B, H, T, D]
    stride_kbb,
    stride_kbh,
    stride_kbs,
    stride_kbd,
    stride_vbb,
    stride_vbh,
    stride_vbs,
    stride_vbd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    # Meta-parameters
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    batch = pid_bh // H
    head = pid_bh % H
    offs_t = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    rows = offset + offs_t

    k = tl.load(
        k_ptr + batch * stride_kb + head * stride_kh + offs_t[:, None] * stride_kt + offs_d[None, :] * stride_kd,
        mask=mask,
    )
    tl.store(
        k_buf_ptr + batch * stride_kbb + head * stride_kbh + rows[:, None] * stride_kbs + offs_d[None, :] * stride_kbd,
        k,
        mask=mask,
    )
    v = tl.load(
        v_ptr + batch * stride_vb + head * stride_vh + offs_t[:, None] * stride_vt + offs_d[None, :] * stride_vd,
        mask=mask,
    )
    tl.store(
        v_buf_ptr + batch * stride_vbb + head * stride_vbh + rows[:, None] * stride_vbs + offs_d[None, :] * stride_vbd,
        v,
        mask=mask,
    )


@triton.jit
def _round_to(acc, dtype: tl.constexpr):
    """fp32 → dtype rounding to nearest even, as torch's ``.to(dtype)``.

    bf16 by bit arithmetic: the interpreter (triton 3.9) truncates fp32 → bf16 in ``.to``, which GPUs round to
    nearest even (``cvt.rn.bf16.f32``); the bit form gives torch's result on both, NaN mapped to 0x7FC0 as torch.
    """
    if dtype == tl.bfloat16:
        bits = acc.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(acc != acc, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return acc.to(dtype)


@triton.jit
def _prefix_kv_fill_bwd_kernel(
    # Pointers
    dk_ptr,
    dv_ptr,
    out_ptr,
    # Dimensions
    B,
    H,
    P,
    D,
    # Strides (elements): dK_l / dV_l [B, H, S, D] at dk_ptr + l·stride_dkl / dv_ptr + l·stride_dvl; out [L, 2, H, P, D]
    stride_dkl,
    stride_dkb,
    stride_dkh,
    stride_dks,
    stride_dkd,
    stride_dvl,
    stride_dvb,
    stride_dvh,
    stride_dvs,
    stride_dvd,
    stride_ol,
    stride_okv,
    stride_oh,
    stride_op,
    stride_od,
    # Meta-parameters
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_lh = tl.program_id(0).to(tl.int64)
    layer = pid_lh // H
    head = pid_lh % H
    offs_r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_r < P)[:, None] & (offs_d < D)[None, :]

    # ---- Σ_b in the order b = 0..B-1, fp32 from zero: the reference's sequential sum, bit for bit
    dk = dk_ptr + layer * stride_dkl + head * stride_dkh + offs_r[:, None] * stride_dks + offs_d[None, :] * stride_dkd
    dv = dv_ptr + layer * stride_dvl + head * stride_dvh + offs_r[:, None] * stride_dvs + offs_d[None, :] * stride_dvd
    acc_k = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for _ in range(B):
        acc_k += tl.load(dk, mask=mask, other=0.0).to(tl.float32)
        acc_v += tl.load(dv, mask=mask, other=0.0).to(tl.float32)
        dk += stride_dkb
        dv += stride_dvb

    # ---- round once to the gradient dtype
    out = out_ptr + layer * stride_ol + head * stride_oh + offs_r[:, None] * stride_op + offs_d[None, :] * stride_od
    tl.store(out, _round_to(acc_k, out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + stride_okv, _round_to(acc_v, out_ptr.dtype.element_ty), mask=mask)


KERNELS = {
    "prefix_kv_fill": _prefix_kv_fill_kernel,
    "kv_append": _kv_append_kernel,
    "prefix_kv_fill_bwd": _prefix_kv_fill_bwd_kernel,
}


# ---------------------------------------------------------------------------------------------------- heuristics
def blocks(rows: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for a [rows, head_dim] copy: the whole head dim (≤ 256) per tile, rows up to
    ``_TILE_ELEMENTS`` elements; fewer warps for small tiles (T = 1 decode: one row of hd elements)."""
    block_d = min(triton.next_power_of_2(max(head_dim, 1)), _MAX_BLOCK_D)
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), _TILE_ELEMENTS // block_d))
    elements = block_r * block_d
    num_warps = 4 if elements >= 1024 else (2 if elements >= 256 else 1)
    return block_r, block_d, num_warps


def _grid(programs: int, rows: int, head_dim: int, block_r: int, block_d: int) -> tuple[int, int, int]:
    return (programs, triton.cdiv(rows, block_r), triton.cdiv(head_dim, block_d))


def _layer_stride(tensors: list[torch.Tensor]) -> int | None:
    """Element distance between consecutive tensors when they are views of one allocation at equal, non-zero
    distances with one shape and one set of strides (then one launch addresses layer l as base + l·distance)."""
    first = tensors[0]
    if len(tensors) == 1:
        return 0
    storage = first.untyped_storage().data_ptr()
    if any(
        t.shape != first.shape or t.stride() != first.stride() or t.untyped_storage().data_ptr() != storage
        for t in tensors
    ):
        return None
    distance = tensors[1].storage_offset() - first.storage_offset()
    if distance == 0:
        return None  # aliased buffers: the reference writes them in layer order, the last one wins; keep that
    if any(t.storage_offset() - first.storage_offset() != i * distance for i, t in enumerate(tensors)):
        return None
    return distance


# ---------------------------------------------------------------------------------------------------- reasons
def _tensor_reasons(named: dict[str, torch.Tensor], dtype: torch.dtype) -> list[str]:
    reasons = []
    if dtype not in _launch.SUPPORTED_DTYPES:
        reasons.append(f"dtype {dtype} (supported: float32, float16, bfloat16)")
    for name, t in named.items():
        if t.dtype != dtype:
            reasons.append(f"{name} is {t.dtype}, not {dtype}")
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        reasons.append(f"tensors on several devices: {sorted(str(d) for d in devices)}")
    elif not interpreting():
        device = next(iter(devices))
        if device.type != "cuda":
            reasons.append(f"tensors are on {device} (needs a CUDA device, or TRITON_INTERPRET=1 for CPU tensors)")
    return reasons


def not_supported_reasons(op_name: str, *args) -> list[str]:
    """Every reason this backend cannot run ``op_name`` on these arguments (empty: it can).

    prefix_kv_fill: (prefix, k_bufs, v_bufs); kv_append: (k_buf, v_buf, k, v, offset);
    prefix_kv_fill_bwd: (dk_bufs, dv_bufs, P). Shapes are validated by the ops' own checks; here only what the
    kernels cannot do: dtypes other than fp32/fp16/bf16 or mixed, tensors off the GPU (unless interpreting),
    more row or head-dim tiles than a grid dimension holds.
    """
    if op_name == "prefix_kv_fill":
        prefix, k_bufs, v_bufs = args
        named = {"prefix": prefix} | {f"k_bufs[{i}]": t for i, t in enumerate(k_bufs)}
        named |= {f"v_bufs[{i}]": t for i, t in enumerate(v_bufs)}
        reasons = _tensor_reasons(named, prefix.dtype)
        rows, head_dim = prefix.shape[3], prefix.shape[4]
    elif op_name == "kv_append":
        k_buf, v_buf, k, v = args[:4]
        reasons = _tensor_reasons({"k_buf": k_buf, "v_buf": v_buf, "k": k, "v": v}, k_buf.dtype)
        rows, head_dim = k.shape[2], k.shape[3]
    elif op_name == "prefix_kv_fill_bwd":
        dk_bufs, dv_bufs, prefix_len = args
        if not dk_bufs:
            return ["no gradients (zero layers)"]
        named = {f"dk_bufs[{i}]": t for i, t in enumerate(dk_bufs)}
        named |= {f"dv_bufs[{i}]": t for i, t in enumerate(dv_bufs)}
        reasons = _tensor_reasons(named, dk_bufs[0].dtype)
        rows, head_dim = prefix_len, dk_bufs[0].shape[3]
    else:
        return [f"no Triton kernel for {op_name}"]
    block_r, block_d, _ = blocks(rows, head_dim)
    if triton.cdiv(rows, block_r) > _MAX_GRID_YZ or triton.cdiv(head_dim, block_d) > _MAX_GRID_YZ:
        reasons.append(f"{rows} rows × head dim {head_dim} need more tiles than a grid dimension holds")
    return reasons


# ---------------------------------------------------------------------------------------------------- launchers
def prefix_kv_fill(prefix: torch.Tensor, k_bufs: list[torch.Tensor], v_bufs: list[torch.Tensor]) -> None:
    """K_l[:, :, :P] = prefix[l, 0], V_l[:, :, :P] = prefix[l, 1] for every batch row; one launch when the buffers
    are equally spaced views of one allocation, else one launch per layer.

    Args: prefix (L, 2, Hkv, P, hd); k_bufs, v_bufs: L tensors (B, Hkv, S >= P, hd), prefix's dtype and device.
    """
    n_layers, _, heads, prefix_len, head_dim = prefix.shape
    if n_layers == 0 or prefix_len == 0 or head_dim == 0 or heads == 0 or k_bufs[0].shape[0] == 0:
        return
    block_r, block_d, num_warps = blocks(prefix_len, head_dim)
    k_stride, v_stride = _layer_stride(k_bufs), _layer_stride(v_bufs)
    if k_stride is not None and v_stride is not None:
        groups = [(prefix, k_bufs[0], v_bufs[0], k_stride, v_stride, n_layers)]
    else:
        groups = [(prefix[i : i + 1], k_bufs[i], v_bufs[i], 0, 0, 1) for i in range(n_layers)]
    with _launch.device_guard(prefix):
        for pre, k_buf, v_buf, k_layer, v_layer, layers in groups:
            _prefix_kv_fill_kernel[_grid(layers * heads, prefix_len, head_dim, block_r, block_d)](
                pre, k_buf, v_buf,
                k_buf.shape[0], heads, prefix_len, head_dim,
                *pre.stride(), k_layer, *k_buf.stride(), v_layer, *v_buf.stride(),
                BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps, enable_fp_fusion=_launch.FP_FUSION,
            )  # fmt: skip


def kv_append(k_buf: torch.Tensor, v_buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> None:
    """K[:, :, offset:offset+T] = k, V[:, :, offset:offset+T] = v in one launch.

    Args: k_buf, v_buf (B, Hkv, S, hd); k, v (B, Hkv, T, hd), the buffers' dtype and device; any strides.
    """
    batch, heads, rows, head_dim = k.shape
    if batch == 0 or heads == 0 or rows == 0 or head_dim == 0:
        return
    block_r, block_d, num_warps = blocks(rows, head_dim)
    with _launch.device_guard(k_buf):
        _kv_append_kernel[_grid(batch * heads, rows, head_dim, block_r, block_d)](
            k_buf, v_buf, k, v,
            heads, rows, head_dim, int(offset),
            *k_buf.stride(), *v_buf.stride(), *k.stride(), *v.stride(),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps, enable_fp_fusion=_launch.FP_FUSION,
        )  # fmt: skip


def prefix_kv_fill_bwd(dk_bufs: list[torch.Tensor], dv_bufs: list[torch.Tensor], prefix_len: int) -> torch.Tensor:
    """out[l, 0] = Σ_b dK_l[b, :, :P], out[l, 1] = Σ_b dV_l[b, :, :P] (b in order, fp32, rounded once).

    Args: dk_bufs, dv_bufs: L tensors (B, Hkv, S >= P, hd), one dtype, any strides. Returns (L, 2, Hkv, P, hd).
    """
    first = dk_bufs[0]
    n_layers = len(dk_bufs)
    batch, heads, _rows, head_dim = first.shape
    out = first.new_empty((n_layers, 2, heads, prefix_len, head_dim))
    if batch == 0:
        return out.zero_()
    if out.numel() == 0:
        return out
    block_r, block_d, num_warps = blocks(prefix_len, head_dim)
    k_stride, v_stride = _layer_stride(dk_bufs), _layer_stride(dv_bufs)
    if k_stride is not None and v_stride is not None:
        groups = [(dk_bufs[0], dv_bufs[0], out, k_stride, v_stride, n_layers)]
    else:
        groups = [(dk_bufs[i], dv_bufs[i], out[i : i + 1], 0, 0, 1) for i in range(n_layers)]
    with _launch.device_guard(first):
        for dk, dv, dst, k_layer, v_layer, layers in groups:
            _prefix_kv_fill_bwd_kernel[_grid(layers * heads, prefix_len, head_dim, block_r, block_d)](
                dk, dv, dst,
                batch, heads, prefix_len, head_dim,
                k_layer, *dk.stride(), v_layer, *dv.stride(), *dst.stride(),
                BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps, enable_fp_fusion=_launch.FP_FUSION,
            )  # fmt: skip
    return out
