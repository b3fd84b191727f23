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

import functools

import torch

# Up to this many rows (decode batches) the update runs stacked: every adapter's A and B concatenated, two GEMMs and
# a row mask (a fixed handful of ops for any number of adapters) instead of a gather, two GEMMs and a scatter per
# adapter; the extra FLOPs, M·Σr·(K+N), are small next to the base GEMM at such M.
STACKED_MAX_ROWS = 64


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
    stackable = len({t.dtype for t in (*lora_a, *lora_b)}) == 1
    # Autograd takes the grouped path: unused adapters then get no gradient (None), as in PEFT, not zeros.
    inference = not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *lora_a, *lora_b)))
    if x.shape[0] <= STACKED_MAX_ROWS and stackable and inference:
        return _add_stacked(y, x, lora_a, lora_b, lora_b_bias, scaling, row_adapter)
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


@functools.lru_cache(maxsize=256)
def _stacked_columns(ranks: tuple, scaling: tuple, dtype: torch.dtype, device: torch.device):
    """(owner, scale): the adapter index and s_a of each of the Σr stacked columns (cached per layer setup)."""
    counts = torch.tensor(ranks, device=device)
    owner = torch.repeat_interleave(torch.arange(len(ranks), device=device), counts)
    return owner, torch.repeat_interleave(torch.tensor(scaling, dtype=dtype, device=device), counts)


def _add_stacked(y, x, lora_a, lora_b, lora_b_bias, scaling, row_adapter):
    """y + per-row s_g·(x·A_gᵀ·B_gᵀ + b_Bg) as ((x·A*ᵀ) ⊙ mask)·B*ᵀ with A* = cat_a A_a (Σr, K), B* = cat_a B_a
    (N, Σr) and mask[m, j] = s_a where column j belongs to adapter a = g[m], else 0: the same sums, plus zeros."""
    acc = torch.promote_types(lora_a[0].dtype, torch.float32)
    ranks = tuple(a.shape[0] for a in lora_a)
    owner, scale = _stacked_columns(ranks, tuple(scaling), acc, x.device)
    mask = torch.where(
        row_adapter[:, None] == owner[None, :], scale[None, :], torch.zeros((), dtype=acc, device=x.device)
    )
    a_cat = torch.cat(lora_a)
    shrink = torch.mm(x if x.dtype == a_cat.dtype else x.to(a_cat.dtype), a_cat.t()).to(acc) * mask
    update = torch.mm(shrink, torch.cat(lora_b, dim=1).t().to(acc))
    if any(t is not None for t in lora_b_bias):
        biases = torch.stack([torch.zeros_like(y[0], dtype=acc) if t is None else t.to(acc) for t in lora_b_bias])
        adapter_scale = mask[:, torch.tensor([sum(ranks[:i]) for i in range(len(ranks))], device=x.device)]
        update = update + adapter_scale @ biases  # s_g·b_Bg on each row, 0 on base rows
    return y.add_(update if update.dtype == y.dtype else update.to(y.dtype))


def not_supported_reasons(op_name: str, *args) -> list[str]:
    """The reference runs every call of its ops (the spec): never a reason."""
    return []
