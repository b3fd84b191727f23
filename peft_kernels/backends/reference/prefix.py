"""Reference prefix key/value writes: the specification of ``prefix_kv_fill``, ``kv_append``, ``prefix_kv_fill_bwd``.

Shapes (transformers' cache layout; ``L`` layers, ``B`` batch, ``Hkv`` key/value heads, ``P`` virtual tokens,
``hd`` head dim, ``S = P + T_max`` buffer rows)::

    prefix        [L, 2, Hkv, P, hd]      unbatched, index 0 = keys, 1 = values (PEFT's encoder output viewed)
    k_bufs[l]     [B, Hkv, S, hd]         per-layer key buffer, any strides; v_bufs[l] likewise
    k, v          [B, Hkv, T, hd]         new keys/values of one layer

Semantics::

    prefix_kv_fill:      K_l[b, :, 0:P] = prefix[l, 0]     V_l[b, :, 0:P] = prefix[l, 1]        for every b, l
    kv_append:           K[:, :, offset:offset+T] = k      V[:, :, offset:offset+T] = v
    prefix_kv_fill_bwd:  d[l, 0] = Σ_b dK_l[b, :, 0:P]     d[l, 1] = Σ_b dV_l[b, :, 0:P]      [L, 2, Hkv, P, hd]

The writes are copies (bitwise; equal to slicing the matching ``torch.cat``). The gradient sums over b in the
fixed order b = 0, 1, …, B-1, one fp32 addition at a time in acc = promote_types(dtype, float32), then rounds
once to the buffers' dtype: a kernel doing the same sequential fp32 additions is bitwise equal.

Memory traffic: fill reads the prefix once per batch row (B·L·2·Hkv·P·hd elements read and written; the kernel
reads it once); append reads and writes 2·B·Hkv·T·hd elements; the gradient stacks the B prefix rows of every
layer (an [L·2, B, Hkv, P, hd] temporary the kernel never builds) and reads it once.
"""

from __future__ import annotations

import torch


def prefix_kv_fill(prefix: torch.Tensor, k_bufs: list[torch.Tensor], v_bufs: list[torch.Tensor]) -> None:
    """K_l[b, :, :P] = prefix[l, 0], V_l[b, :, :P] = prefix[l, 1] for every batch row b, in place.

    Args:
        prefix: (L, 2, Hkv, P, hd).  k_bufs, v_bufs: L tensors (B, Hkv, S >= P, hd), prefix's dtype, any strides.
    Rows P: of every buffer are left untouched.
    """
    n_layers, _, n_heads, n_prefix, head_dim = prefix.shape
    if n_layers == 0:
        return
    batch = k_bufs[0].shape[0]
    # [L, 2, Hkv, P, hd] → expanded (no copy) [L·2, B, Hkv, P, hd] → views in the order k_0, v_0, k_1, v_1, …
    sources = prefix.unsqueeze(2).expand(n_layers, 2, batch, n_heads, n_prefix, head_dim).flatten(0, 1).unbind(0)
    # narrow, not [:, :, :P]: the same view at a fraction of the Python indexing cost
    targets = [buf.narrow(2, 0, n_prefix) for pair in zip(k_bufs, v_bufs) for buf in pair]
    # One call for the 2L copies: the per-copy Python and dispatch overhead was most of the fill at training sizes.
    torch._foreach_copy_(targets, sources)


def kv_append(k_buf: torch.Tensor, v_buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> None:
    """K[:, :, offset:offset+T] = k, V[:, :, offset:offset+T] = v, in place.

    Args:
        k_buf, v_buf: (B, Hkv, S, hd).  k, v: (B, Hkv, T, hd), the buffers' dtype.  offset: 0 <= offset <= S - T.
    """
    n_new = k.shape[2]
    k_buf.narrow(2, offset, n_new).copy_(k)
    v_buf.narrow(2, offset, n_new).copy_(v)


def prefix_kv_fill_bwd(dk_bufs: list[torch.Tensor], dv_bufs: list[torch.Tensor], prefix_len: int) -> torch.Tensor:
    """d[l, 0] = Σ_b dK_l[b, :, :P], d[l, 1] = Σ_b dV_l[b, :, :P], summed over b = 0..B-1 in order.

    Args:
        dk_bufs, dv_bufs: L tensors (B, Hkv, S >= P, hd), one dtype.  prefix_len: P.
    Returns: (L, 2, Hkv, P, hd) in the buffers' dtype; accumulated in promote_types(dtype, float32).
    """
    dtype = dk_bufs[0].dtype
    acc = torch.promote_types(dtype, torch.float32)
    # [L·2, B, Hkv, P, hd]: the prefix rows of every buffer gradient (k_0, v_0, k_1, …), one copy
    rows = torch.stack([grad.narrow(2, 0, prefix_len) for pair in zip(dk_bufs, dv_bufs) for grad in pair])
    total = torch.zeros((rows.shape[0], *rows.shape[2:]), dtype=acc, device=rows.device)
    for row in rows.unbind(1):
        # One elementwise addition per batch row (promotes the row exactly to acc): a fixed order.
        total.add_(row)
    return total.to(dtype).view(len(dk_bufs), 2, *rows.shape[2:])


def not_supported_reasons(op_name: str, *args) -> list[str]:
    """The reference runs every call of its ops."""
    return []
