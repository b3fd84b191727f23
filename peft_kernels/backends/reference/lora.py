"""Reference LoRA linear: the specification of ``lora_linear_fwd`` / ``lora_linear_bwd``.

Semantics (n active adapters, a = 1..n)::

    x̂_a = m_a ⊙ x / (1 - p_a)          m_a = dropout mask(seed_a, M, K, p_a); x̂_a = x when p_a == 0
                                       (the Philox spec of dropout.py; on CPU a faster seeded generator)
    S_a = x̂_a · A_aᵀ                   [M, r_a], kept in acc_a = promote_types(A_a.dtype, float32)
    y   = x · Wᵀ + b + Σ_a s_a · (S_a · B_aᵀ + b_Ba)        [M, N], dtype of x

Backward (W frozen, dW is the autograd Function's business)::

    dS_a = s_a · dY · B_a               [M, r_a]   (acc_a)
    dB_a = s_a · dYᵀ · S_a              [N, r_a]   (dtype of B_a)
    dA_a = dS_aᵀ · x̂_a                  [r_a, K]   (dtype of A_a)
    dx   = dY · W + Σ_a m_a ⊙ (dS_a · A_a) / (1 - p_a)      [M, K], dtype of x

Memory traffic of this eager reference with p = 0 and matching dtypes: the base ``addmm`` plus one ``mm`` for
S (reads x, 2MK bytes in bf16) and one in-place ``addmm_`` into y (reads and writes y, 4MN): no M×N
temporaries. With p > 0 it materializes x̂ (an M×K temporary) which the fused kernels never do.
"""

from __future__ import annotations

import torch

from .dropout import dropout_keep_mask


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _keep_mask(x: torch.Tensor, p: float, seeds, index: int) -> torch.Tensor:
    """m_a, bool (M, K), for adapter ``index`` (dropout.dropout_keep_mask)."""
    return dropout_keep_mask(seeds[index], x.shape[0], x.shape[1], p, x.device)


def cpu_keep_masks(x: torch.Tensor, dropout_p: list[float], seeds) -> list[torch.Tensor | None]:
    """[m_a] bool (M, K) per adapter (None where p_a == 0): the masks of ``dropout.dropout_keep_mask``.

    Eager CPU calls (ops/lora.py) draw them once in the forward and keep them for the backward, 1 byte per
    element: regenerating costs two more elementwise passes over M×K, which on CPU cost more than the whole
    low-rank update (measured: 3 ms uniform + 11 ms compare per 512×768 mask on the 2-core CI box). The fused
    GPU kernels regenerate instead and keep nothing.
    """
    return [None if p == 0.0 else _keep_mask(x, p, seeds, i) for i, p in enumerate(dropout_p)]


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
    keep_masks: list[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y = x·Wᵀ + b + Σ_a s_a·(x̂_a·A_aᵀ·B_aᵀ + b_Ba); returns (y, [S_a]).

    Args:
        x: (M, K), any strides.
        weight: (N, K), any strides (a GPT-2 Conv1D weight arrives as its transposed view).
        bias: (N,) or None.
        lora_a: n tensors (r_a, K).  lora_b: n tensors (N, r_a).  lora_b_bias: n tensors (N,) or None.
        scaling, dropout_p: n floats.  seeds: int64 (n,) or None when every p is 0.
        keep_masks: optional [m_a] from ``cpu_keep_masks`` (not part of the op schema: eager CPU calls only).
    Accumulates in promote_types(dtype, float32); y has x's dtype, S_a has acc_a.
    """
    y = torch.nn.functional.linear(x, weight, bias)
    return add_lora_fwd(y, x, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds, keep_masks)


def add_lora_fwd(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    lora_b_bias: list[torch.Tensor | None],
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor | None,
    keep_masks: list[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(y + Σ_a s_a·(x̂_a·A_aᵀ·B_aᵀ + b_Ba), [S_a]) for a base output y (M, N): the LoRA half of the forward,
    shared with the quantized-base references (updates y in place when the dtypes allow)."""
    saved_s = []
    for index, (a, b, b_bias, s, p) in enumerate(zip(lora_a, lora_b, lora_b_bias, scaling, dropout_p)):
        acc = _acc_dtype(a.dtype)
        x_cast = x if x.dtype == a.dtype else x.to(a.dtype)
        if p == 0.0:
            shrink = torch.mm(x_cast, a.t())  # [M, r]
        else:
            # (m ⊙ x)·Aᵀ / (1-p): the 1/(1-p) goes on the small [M, r] product, not on x. The mask is the one
            # the caller kept (eager CPU) or regenerated from the seed: the same bits, the same arithmetic.
            keep = keep_masks[index] if keep_masks is not None else _keep_mask(x, p, seeds, index)
            shrink = torch.mm(torch.mul(x_cast, keep), a.t()).mul_(1.0 / (1.0 - p))
        if shrink.dtype != acc:
            shrink = shrink.to(acc)
        saved_s.append(shrink)
        if b.dtype == y.dtype and shrink.dtype == y.dtype:
            # Same dtype: accumulate the expand into y in place, no M×N temporary.
            y.addmm_(shrink, b.t(), alpha=s)
            if b_bias is not None:
                y.add_(b_bias, alpha=s)
        else:
            # Mixed precision (fp32 adapters on a 16-bit base, PEFT's default): add in acc, round once.
            update = torch.mm(shrink, b.t().to(acc))
            if b_bias is not None:
                update.add_(b_bias.to(acc))
            y = torch.add(y.to(acc), update, alpha=s).to(y.dtype)
    return y, saved_s


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
    keep_masks: list[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
    """(dx, [dA_a], [dB_a]) of lora_linear_fwd; see the module docstring.

    Args:
        dy: (M, N).  x, weight, lora_a, lora_b, scaling, dropout_p, seeds: as in the forward.
        saved_s: the forward's [S_a], (M, r_a) in acc_a.
        output_mask: [need dx, need the adapter gradients]; what is not needed is not computed
            (dx None, lists empty).
    dx has x's dtype; dA_a, dB_a the dtypes of A_a, B_a.
    """
    need_dx, need_adapters = output_mask
    dx = torch.mm(dy, weight.to(dy.dtype)).to(x.dtype) if need_dx else None
    return add_lora_bwd(dx, dy, x, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, need_adapters, keep_masks)


def add_lora_bwd(
    dx: torch.Tensor | None,
    dy: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    saved_s: list[torch.Tensor],
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor | None,
    need_adapters: bool,
    keep_masks: list[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
    """(dx + Σ_a m_a ⊙ (dS_a·A_a)/(1-p_a), [dA_a], [dB_a]) for the base part dx = dY·W (M, K) or None (dx not
    needed): the LoRA half of the backward, shared with the quantized-base references."""
    need_dx = dx is not None
    d_lora_a, d_lora_b = [], []
    for index, (a, b, shrink, s, p) in enumerate(zip(lora_a, lora_b, saved_s, scaling, dropout_p)):
        acc = _acc_dtype(a.dtype)
        dy_acc = dy.to(acc)
        d_shrink = torch.mm(dy_acc, b.to(acc)).mul_(s)  # [M, r]
        if p == 0.0:
            if need_adapters:
                d_lora_b.append(torch.mm(dy_acc.t(), shrink).mul_(s).to(b.dtype))  # [N, r]
                x_acc = x if x.dtype == acc else x.to(acc)
                d_lora_a.append(torch.mm(d_shrink.t(), x_acc).to(a.dtype))  # [r, K]
            if need_dx:
                if dx.dtype == acc:
                    dx.addmm_(d_shrink, a)
                else:
                    dx = torch.add(dx.to(acc), torch.mm(d_shrink, a.to(acc))).to(x.dtype)
            continue
        # Dropout: the kept (eager CPU) or regenerated mask; 1/(1-p) goes on dA [r, K] and on the add into dx,
        # not on M×K tensors.
        keep = keep_masks[index] if keep_masks is not None else _keep_mask(x, p, seeds, index)
        inv_keep = 1.0 / (1.0 - p)
        if need_adapters:
            d_lora_b.append(torch.mm(dy_acc.t(), shrink).mul_(s).to(b.dtype))  # [N, r]
            x_acc = x if x.dtype == acc else x.to(acc)
            d_lora_a.append(torch.mm(d_shrink.t(), torch.mul(x_acc, keep)).mul_(inv_keep).to(a.dtype))
        if need_dx:
            dx_lora = torch.mm(d_shrink, a.to(acc)).mul_(keep)  # [M, K]
            if dx.dtype == acc:
                dx.add_(dx_lora, alpha=inv_keep)
            else:
                dx = torch.add(dx.to(acc), dx_lora, alpha=inv_keep).to(x.dtype)
    return dx, d_lora_a, d_lora_b
