"""Prefix key/value writes as registered (mutating) ops plus their autograd Functions.

``prefix_kv_fill`` (public; ``prefix_kv_write`` is its former name) → ``PrefixFillFunction`` →
``torch.ops.peft_kernels.prefix_kv_fill`` (forward) and ``prefix_kv_fill_bwd`` (backward);
``kv_append`` (public) → ``KvAppendFunction`` → ``torch.ops.peft_kernels.kv_append``.
Shapes and semantics: ``backends/reference/prefix.py``.

How a cache uses them (``layers/prefix.py`` ``PrefixKVBuffers``, ``tuners/prefix_cache_builder.py``)::

    k_bufs = [torch.empty(B, Hkv, P + T_max, hd) for each layer]; v_bufs likewise   # torch's allocator
    k_bufs, v_bufs = prefix_kv_fill(prefix, k_bufs, v_bufs)           # once per forward, one launch
    k_l, v_l = kv_append(k_bufs[l], v_bufs[l], k, v, offset=P + seen)  # per layer and step
    keys, values = k_l[:, :, : P + seen + T], v_l[:, :, : P + seen + T]  # views for attention

The buffers are written in place and returned as the same tensor objects; when the prefix (or ``k``/``v``)
requires grad they come back carrying the autograd history (``mark_dirty``), so ``dprefix = Σ_b dK[b, :, :P]``
and ``dk = dK[:, :, offset:offset+T]`` flow without any copy of the prefix per batch row. In training a view
taken before a later append of the same buffer must not be saved for backward (autograd's version check
raises if it is); a training forward appends once per layer, so this only concerns multi-step decoding
with gradients, which PEFT does not do.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _dispatch
from ._library import define_op


def _fill_fake(prefix, k_bufs, v_bufs):
    torch._check(prefix.dim() == 5 and prefix.shape[1] == 2, lambda: "prefix must be (L, 2, Hkv, P, hd)")
    torch._check(len(k_bufs) == prefix.shape[0] and len(v_bufs) == prefix.shape[0], lambda: "one buffer per layer")
    for buf in (*k_bufs, *v_bufs):
        torch._check(buf.dim() == 4, lambda: "buffers must be (B, Hkv, S, hd)")
        torch._check(buf.dtype == prefix.dtype, lambda: "buffers must have the prefix's dtype")
        torch._check(buf.shape[2] >= prefix.shape[3], lambda: "buffers must have at least P rows")


def _append_fake(k_buf, v_buf, k, v, offset):
    torch._check(k.dim() == 4 and v.shape == k.shape, lambda: "k and v must be (B, Hkv, T, hd) of one shape")
    torch._check(k_buf.dtype == k.dtype and v_buf.dtype == v.dtype, lambda: "k/v must have the buffers' dtype")
    torch._check(offset >= 0 and offset + k.shape[2] <= k_buf.shape[2], lambda: "rows offset..offset+T must fit")


def _fill_bwd_fake(dk_bufs, dv_bufs, prefix_len):
    torch._check(len(dk_bufs) > 0 and len(dv_bufs) == len(dk_bufs), lambda: "one gradient per layer, at least one")
    first = dk_bufs[0]
    torch._check(first.dim() == 4 and first.shape[2] >= prefix_len, lambda: "gradients must be (B, Hkv, S >= P, hd)")
    return first.new_empty((len(dk_bufs), 2, first.shape[1], prefix_len, first.shape[3]))


# Schemas in backends/__init__.py: mutated buffers are declared there (Tensor(a!)), so functionalization,
# torch.compile and opcheck see the writes.
define_op("prefix_kv_fill", _fill_fake)
define_op("kv_append", _append_fake)
define_op("prefix_kv_fill_bwd", _fill_bwd_fake)


def _zero_rows(grad: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """dBuf_in = dBuf_out with rows start:stop zeroed: those rows were overwritten, so the old contents got no say."""
    grad = grad.clone()
    grad[:, :, start:stop] = 0
    return grad


class PrefixFillFunction(torch.autograd.Function):
    """K_l[:, :, :P] = prefix[l, 0], V_l[:, :, :P] = prefix[l, 1] (broadcast over B), in place.

    Chain rule (dK_l = ∂L/∂K_l after the write)::

        dprefix[l, 0] = Σ_b dK_l[b, :, :P]      dprefix[l, 1] = Σ_b dV_l[b, :, :P]      (fixed order over b)
        dK_l(before)  = dK_l with rows :P zeroed (overwritten), only when the buffer itself requires grad

    Inputs: prefix, then the L key buffers, then the L value buffers (variadic, so autograd sees each one).
    Saves nothing but P and the prefix dtype.
    """

    @staticmethod
    def forward(ctx, prefix, *bufs):
        n_layers = len(bufs) // 2
        torch.ops.peft_kernels.prefix_kv_fill(prefix, list(bufs[:n_layers]), list(bufs[n_layers:]))
        ctx.mark_dirty(*bufs)
        ctx.prefix_len, ctx.prefix_dtype = prefix.shape[3], prefix.dtype
        ctx.forced_backend = _dispatch.forced_backend()
        return bufs

    @staticmethod
    def backward(ctx, *grads):
        n_layers = len(grads) // 2
        d_prefix = None
        if ctx.needs_input_grad[0]:
            d_prefix = _dispatch.run_with_backend(
                ctx.forced_backend,
                torch.ops.peft_kernels.prefix_kv_fill_bwd,
                list(grads[:n_layers]),
                list(grads[n_layers:]),
                ctx.prefix_len,
            ).to(ctx.prefix_dtype)
        d_bufs = [
            _zero_rows(grad, 0, ctx.prefix_len) if needs else None
            for grad, needs in zip(grads, ctx.needs_input_grad[1:])
        ]
        return (d_prefix, *d_bufs)


class KvAppendFunction(torch.autograd.Function):
    """K[:, :, o:o+T] = k, V[:, :, o:o+T] = v, in place.

    Chain rule: dk = dK[:, :, o:o+T], dv = dV[:, :, o:o+T]; dK(before) = dK with rows o:o+T zeroed.
    With ``fresh_rows`` (rows o:o+T never written under autograd, e.g. a buffer allocated for this forward) no
    gradient can flow from those rows into anything, so dK passes through unchanged: no clone of the buffer-sized
    gradient per layer (that clone was the one allocation by which a prefix training step exceeded PEFT's).
    Inputs: offset, fresh_rows, k_buf, v_buf, k, v. Saves only the offset and T.
    """

    @staticmethod
    def forward(ctx, offset, fresh_rows, k_buf, v_buf, k, v):
        torch.ops.peft_kernels.kv_append(k_buf, v_buf, k, v, offset)
        ctx.mark_dirty(k_buf, v_buf)
        ctx.rows = (offset, k.shape[2])
        ctx.fresh_rows = fresh_rows
        return k_buf, v_buf

    @staticmethod
    def backward(ctx, d_k_buf, d_v_buf):
        start, rows = ctx.rows
        _, _, needs_kb, needs_vb, needs_k, needs_v = ctx.needs_input_grad
        # narrow, not [:, :, start:stop]: the same view at a fraction of the Python indexing cost (per layer)
        d_k = d_k_buf.narrow(2, start, rows) if needs_k else None
        d_v = d_v_buf.narrow(2, start, rows) if needs_v else None
        if ctx.fresh_rows:
            return None, None, d_k_buf if needs_kb else None, d_v_buf if needs_vb else None, d_k, d_v
        d_kb = _zero_rows(d_k_buf, start, start + rows) if needs_kb else None
        d_vb = _zero_rows(d_v_buf, start, start + rows) if needs_vb else None
        return None, None, d_kb, d_vb, d_k, d_v


def prefix_kv_fill(
    prefix: torch.Tensor,
    k_bufs: Sequence[torch.Tensor],
    v_bufs: Sequence[torch.Tensor],
    backend: str | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """K_l[:, :, :P] = prefix[l, 0], V_l[:, :, :P] = prefix[l, 1] for every layer l and batch row, in place.

    Args:
        prefix: (L, 2, Hkv, P, hd), e.g. PEFT's prefix encoder output viewed unbatched.
        k_bufs, v_bufs: L tensors (B, Hkv, S >= P, hd), prefix's dtype and device; distinct allocations.
        backend: "reference", "triton", "cuda" or None (then ``PEFT_KERNELS_BACKEND``, then the best available).
    Returns: (k_bufs, v_bufs) as lists of the same tensor objects; differentiable w.r.t. prefix
    (dprefix = Σ_b dK_l[b, :, :P]) when it requires grad.
    """
    k_bufs, v_bufs = list(k_bufs), list(v_bufs)
    _check_fill(prefix, k_bufs, v_bufs)
    fill_checked(prefix, k_bufs, v_bufs, backend)
    return k_bufs, v_bufs


def fill_checked(prefix: torch.Tensor, k_bufs: list, v_bufs: list, backend: str | None) -> None:
    """``prefix_kv_fill`` for a caller that has already made its checks true (``layers/prefix.py``
    ``prefix_kv_buffers``, which allocates the buffers from the prefix's shape, dtype and device)."""
    # Only the prefix and the buffers' own history can need autograd; a fresh buffer has none.
    if torch.is_grad_enabled() and (prefix.requires_grad or any(buf.requires_grad for buf in (*k_bufs, *v_bufs))):
        _dispatch.run_with_backend(backend, PrefixFillFunction.apply, prefix, *k_bufs, *v_bufs)
    else:
        _dispatch.run_with_backend(backend, torch.ops.peft_kernels.prefix_kv_fill, prefix, k_bufs, v_bufs)


prefix_kv_write = prefix_kv_fill  # the name before it matched its op's


def kv_append(
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offset: int,
    backend: str | None = None,
    fresh_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K[:, :, offset:offset+T] = k, V[:, :, offset:offset+T] = v, in place; differentiable w.r.t. k and v.

    Args:
        k_buf, v_buf: (B, Hkv, S, hd).  k, v: (B, Hkv, T, hd), the buffers' dtype and device.
        offset: first row written (P + tokens already cached); offset + T <= S.
        fresh_rows: promise that rows offset..offset+T were never written under autograd (see KvAppendFunction).
    Returns: (k_buf, v_buf), the same tensor objects.
    """
    _check_append(k_buf, v_buf, k, v, offset)
    return append_checked(k_buf, v_buf, k, v, int(offset), backend, fresh_rows)


def append_checked(k_buf, v_buf, k, v, offset: int, backend: str | None, fresh_rows: bool):
    """``kv_append`` for a caller that has already made its checks true (``layers/prefix.py`` ``KVBuffer``, which
    sizes, casts and moves its buffers before appending): per layer and step, so no second pass over them."""
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or k_buf.requires_grad or v_buf.requires_grad):
        _dispatch.run_with_backend(backend, KvAppendFunction.apply, offset, fresh_rows, k_buf, v_buf, k, v)
    else:
        _dispatch.run_with_backend(backend, torch.ops.peft_kernels.kv_append, k_buf, v_buf, k, v, offset)
    return k_buf, v_buf


def _check_fill(prefix, k_bufs, v_bufs) -> None:
    if prefix.dim() != 5 or prefix.shape[1] != 2:
        raise ValueError(f"prefix must be (L, 2, Hkv, P, hd), got {tuple(prefix.shape)}")
    n_layers, _, n_heads, prefix_len, head_dim = prefix.shape
    if len(k_bufs) != n_layers or len(v_bufs) != n_layers:
        raise ValueError(f"expected {n_layers} key and value buffers, got {len(k_bufs)} and {len(v_bufs)}")
    batch = k_bufs[0].shape[0] if k_bufs else 0
    for name, buf in [*(("k_bufs", b) for b in k_bufs), *(("v_bufs", b) for b in v_bufs)]:
        if buf.dim() != 4 or buf.shape[0] != batch or buf.shape[1] != n_heads or buf.shape[3] != head_dim:
            raise ValueError(f"{name} entries must be ({batch}, {n_heads}, S, {head_dim}), got {tuple(buf.shape)}")
        if buf.shape[2] < prefix_len:
            raise ValueError(f"{name} entries have {buf.shape[2]} rows, fewer than the prefix's {prefix_len}")
        if buf.dtype != prefix.dtype or buf.device != prefix.device:
            raise ValueError(
                f"{name} entries must be {prefix.dtype} on {prefix.device}, got {buf.dtype} on {buf.device}"
            )


def _check_append(k_buf, v_buf, k, v, offset) -> None:
    if k_buf.dim() != 4 or v_buf.shape != k_buf.shape:
        raise ValueError(
            f"k_buf and v_buf must be (B, Hkv, S, hd) of one shape, got {tuple(k_buf.shape)}, {tuple(v_buf.shape)}"
        )
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must be (B, Hkv, T, hd) of one shape, got {tuple(k.shape)}, {tuple(v.shape)}")
    batch, n_heads, rows, head_dim = k_buf.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, n_heads, head_dim):
        raise ValueError(f"k has shape {tuple(k.shape)}, expected ({batch}, {n_heads}, T, {head_dim})")
    if not 0 <= offset <= rows - k.shape[2]:
        raise ValueError(f"rows {offset}..{offset + k.shape[2]} do not fit in a buffer of {rows} rows")
    if k.dtype != k_buf.dtype or v.dtype != v_buf.dtype or k.device != k_buf.device or v.device != v_buf.device:
        raise ValueError(f"k/v ({k.dtype} on {k.device}) must match the buffers ({k_buf.dtype} on {k_buf.device})")
