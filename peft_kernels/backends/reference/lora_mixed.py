"""Reference mixed-adapter LoRA linear: the specification of ``lora_linear_mixed``.

One batch, a different adapter per row (PEFT's ``adapter_names=``). With n adapters a = 0..n-1 and
``row_adapter`` g (M,) int, g[m] ∈ {-1, 0, .., n-1} (-1: the base alone)::

    y[m] = x[m]·Wᵀ + b                                                      g[m] = -1
    y[m] = x[m]·Wᵀ + b + s_a·(x[m]·A_aᵀ·B_aᵀ + b_Ba)                        g[m] = a

Shapes: x (M, K), W (N, K) any strides, A_a (r_a, K), B_a (N, r_a), b_Ba (N,) or None; ranks may differ.
Numerics follow PEFT's mixed-batch layer: the base output is rounded to x's dtype first, each row's low-rank
update is computed in acc_a = promote_types(A_a.dtype, float32) and rounded to y's dtype when added.

Rows are grouped by adapter with tensor ops (one stable sort; a loop over adapters, never over rows).
Written with differentiable torch ops, so eager autograd works through it when a caller needs gradients in eval
mode; the registered op itself is forward only.
"""

from __future__ import annotations

import torch


def lora_linear_mixed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    lora_b_bias: list[torch.Tensor | None],
    scaling: list[float],
    row_adapter: torch.Tensor,
) -> torch.Tensor:
    """y (M, N) in x's dtype; see the module docstring. ``row_adapter``: (M,) integer, values in [-1, n)."""
    y = torch.nn.functional.linear(x, weight, bias)
    # One stable sort groups the rows by adapter (-1 first); one host read of the group sizes. Per adapter then:
    # a gather of its rows, two small GEMMs, one scatter-add. Adapters without rows cost nothing.
    # Indices outside [-1, n) (unchecked on accelerators) sort to either end and join no adapter's group.
    n = len(lora_a)
    order = torch.argsort(row_adapter, stable=True)
    sizes = torch.bincount((row_adapter + 1).clamp(0, n + 1), minlength=n + 2).tolist()
    groups = order.split(sizes)[1 : n + 1]
    for a, b, b_bias, s, rows in zip(lora_a, lora_b, lora_b_bias, scaling, groups):
        if rows.numel() == 0:
            continue
        acc = torch.promote_types(a.dtype, torch.float32)
        sub = x.index_select(0, rows)
        shrink = torch.mm(sub if sub.dtype == a.dtype else sub.to(a.dtype), a.t())  # [m_a, r_a]
        # s·(S·Bᵀ + b_B) = (s·S)·Bᵀ + s·b_B: the scaling multiplies the small [m_a, r_a] product.
        shrink = shrink.to(acc) * s
        update = torch.mm(shrink, b.t().to(acc)) if b.dtype != acc else torch.mm(shrink, b.t())
        if b_bias is not None:
            update = update + s * b_bias.to(acc)
        # In place on the fresh base output (autograd allows it: F.linear saves its inputs, not its output).
        y.index_add_(0, rows, update if update.dtype == y.dtype else update.to(y.dtype))
    return y
