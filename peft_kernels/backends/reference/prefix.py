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
layer (an [L, 2, B, Hkv, P, hd] temporary the kernel never builds) and reads it once.
"""

from __future__ import annotations

import torch


def prefix_kv_fill(prefix: torch.Tensor, k_bufs: list[torch.Tensor], v_bufs: list[torch.Tensor]) -> None:
    """K_l[b, :, :P] = prefix[l, 0], V_l[b, :, :P] = prefix[l, 1] for every batch row b, in place.

    Args:
        prefix: (L, 2, Hkv, P, hd).  k_bufs, v_bufs: L tensors (B, Hkv, S >= P, hd), prefix's dtype, any strides.
    Rows P: of every buffer are left untouched.
    """
    n_prefix = prefix.shape[3]
    for layer, (k_buf, v_buf) in enumerate(zip(k_bufs, v_bufs)):
        batch = k_buf.shape[0]
        # prefix[layer, 0]: [Hkv, P, hd] → expanded (no copy) to [B, Hkv, P, hd]
        # narrow, not [:, :, :P]: the same view at a fraction of the Python indexing cost (per layer per step)
        k_buf.narrow(2, 0, n_prefix).copy_(prefix[layer, 0].expand(batch, -1, -1, -1))
        v_buf.narrow(2, 0, n_prefix).copy_(prefix[layer, 1].expand(v_buf.shape[0], -1, -1, -1))


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
    # [L, 2, B, Hkv, P, hd]: the prefix rows of every buffer gradient
    rows = torch.stack(
        [torch.stack([dk[:, :, :prefix_len], dv[:, :, :prefix_len]]) for dk, dv in zip(dk_bufs, dv_bufs)]
    )
    n_layers, _, batch, n_heads, _, head_dim = rows.shape
    total = torch.zeros((n_layers, 2, n_heads, prefix_len, head_dim), dtype=acc, device=rows.device)
    for b in range(batch):
        # One elementwise addition per batch row (promotes rows[:, :, b] exactly to acc): a fixed order.
        total.add_(rows[:, :, b])
    return total.to(dtype)


def not_supported_reasons(op_name: str, *args) -> list[str]:
    """The reference runs every call of its ops."""
    return []
