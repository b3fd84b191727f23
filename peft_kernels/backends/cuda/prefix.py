"""CUDA C++ prefix K/V ops (csrc/prefix_kv.cu): ``prefix_kv_fill``, ``kv_append``, ``prefix_kv_fill_bwd``.

Same signatures and semantics as ``backends/reference/prefix.py`` (bitwise equal: copies, and the gradient's
sequential fp32 sum over the batch). The kernels pick 16-byte copy units when every address and stride allows
and fall back to 4- or 2-byte units otherwise, so only a non-dense last dimension is declined.
"""

from __future__ import annotations

import torch

from ._launch import DTYPE, FLOAT_DTYPES, device_reasons, launch

_MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y (heads) and gridDim.z (2 × batch in kv_append)


def _common(anchor: torch.Tensor, tensors: dict[str, torch.Tensor]) -> list[str]:
    reasons = device_reasons(anchor, **tensors)
    if reasons and reasons[0].startswith("tensors are on"):
        return reasons
    if anchor.dtype not in FLOAT_DTYPES:
        reasons.append(f"dtype {anchor.dtype} is not float16/bfloat16/float32")
    for name, t in tensors.items():
        if t.dtype != anchor.dtype:
            reasons.append(f"{name} is {t.dtype}, not {anchor.dtype}")
        if t.dim() and t.stride(-1) != 1 and t.shape[-1] > 1:
            reasons.append(f"{name} has a non-dense last dimension (stride {t.stride(-1)})")
    return reasons


def _fill_reasons(prefix, k_bufs, v_bufs) -> list[str]:
    bufs = {f"k_bufs[{i}]": t for i, t in enumerate(k_bufs)} | {f"v_bufs[{i}]": t for i, t in enumerate(v_bufs)}
    reasons = _common(prefix, {"prefix": prefix, **bufs})
    if k_bufs:
        first = k_bufs[0]
        if any(t.shape != first.shape or t.stride() != first.stride() for t in bufs.values()):
            reasons.append("the buffers differ in shape or strides (one launch shares them)")
        if first.shape[1] > _MAX_GRID_YZ:
            reasons.append(f"{first.shape[1]} heads > {_MAX_GRID_YZ}")
    return reasons


def _append_reasons(k_buf, v_buf, k, v) -> list[str]:
    reasons = _common(k_buf, {"k_buf": k_buf, "v_buf": v_buf, "k": k, "v": v})
    if k.shape[1] > _MAX_GRID_YZ or 2 * k.shape[0] > _MAX_GRID_YZ:
        reasons.append(f"batch {k.shape[0]} or heads {k.shape[1]} exceed the grid limits")
    return reasons


def _fill_bwd_reasons(dk_bufs, dv_bufs) -> list[str]:
    grads = {f"dk_bufs[{i}]": t for i, t in enumerate(dk_bufs)} | {f"dv_bufs[{i}]": t for i, t in enumerate(dv_bufs)}
    first = dk_bufs[0]
    reasons = device_reasons(first, **grads)
    if reasons and reasons[0].startswith("tensors are on"):
        return reasons
    if first.dtype not in FLOAT_DTYPES or any(t.dtype != first.dtype for t in grads.values()):
        reasons.append("gradients must share one float16/bfloat16/float32 dtype")
    # Element-wise kernel: any strides (zero strides of expanded gradients included), but one set for all 2L.
    if any(t.shape != first.shape or t.stride() != first.stride() for t in grads.values()):
        reasons.append("the gradients differ in shape or strides (one launch shares them)")
    if first.shape[1] > _MAX_GRID_YZ:
        reasons.append(f"{first.shape[1]} heads > {_MAX_GRID_YZ}")
    return reasons


def not_supported_reasons(op_name: str, *args) -> list[str]:
    if op_name == "prefix_kv_fill":
        return _fill_reasons(*args)
    if op_name == "kv_append":
        return _append_reasons(*args[:4])
    if op_name == "prefix_kv_fill_bwd":
        return _fill_bwd_reasons(*args[:2])
    return [f"no CUDA C++ kernel for {op_name}"]


def prefix_kv_fill(prefix: torch.Tensor, k_bufs: list[torch.Tensor], v_bufs: list[torch.Tensor]) -> None:
    """K_l[:, :, :P] = prefix[l, 0], V_l[:, :, :P] = prefix[l, 1] for every batch row; one launch per 64 layers.

    Args: prefix (L, 2, Hkv, P, hd); k_bufs, v_bufs: L tensors (B, Hkv, S >= P, hd) sharing shape and strides.
    """
    from . import extension

    if not k_bufs:
        return
    batch, heads, _rows, head_dim = k_bufs[0].shape
    launch(
        extension().prefix_kv_fill_launch,
        prefix.device,
        prefix.data_ptr(),
        [t.data_ptr() for t in k_bufs],
        [t.data_ptr() for t in v_bufs],
        batch,
        heads,
        prefix.shape[3],
        head_dim,
        list(prefix.stride()[:4]),
        list(k_bufs[0].stride()[:3]),
        DTYPE[prefix.dtype],
    )


def kv_append(k_buf: torch.Tensor, v_buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> None:
    """K[:, :, offset:offset+T] = k, V[:, :, offset:offset+T] = v in one launch.

    Args: k_buf, v_buf (B, Hkv, S, hd); k, v (B, Hkv, T, hd); any strides with a dense last dimension.
    """
    from . import extension

    batch, heads, rows, head_dim = k.shape
    launch(
        extension().kv_append_launch,
        k_buf.device,
        k_buf.data_ptr(),
        v_buf.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        batch,
        heads,
        rows,
        head_dim,
        k_buf.shape[2],
        int(offset),
        list(k_buf.stride()[:3]),
        list(v_buf.stride()[:3]),
        list(k.stride()[:3]),
        list(v.stride()[:3]),
        DTYPE[k_buf.dtype],
    )


def prefix_kv_fill_bwd(dk_bufs: list[torch.Tensor], dv_bufs: list[torch.Tensor], prefix_len: int) -> torch.Tensor:
    """out[l, 0] = Σ_b dK_l[b, :, :P], out[l, 1] = Σ_b dV_l[b, :, :P] (b in order, fp32); (L, 2, Hkv, P, hd)."""
    from . import extension

    first = dk_bufs[0]
    batch, heads, _rows, head_dim = first.shape
    out = torch.empty((len(dk_bufs), 2, heads, prefix_len, head_dim), dtype=first.dtype, device=first.device)
    launch(
        extension().prefix_kv_fill_bwd_launch,
        first.device,
        [t.data_ptr() for t in dk_bufs],
        [t.data_ptr() for t in dv_bufs],
        out.data_ptr(),
        batch,
        heads,
        prefix_len,
        head_dim,
        list(first.stride()),
        DTYPE[first.dtype],
    )
    return out
