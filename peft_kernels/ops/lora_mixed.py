"""Mixed-adapter LoRA linear (PEFT's ``adapter_names=``) as one registered, forward-only op.

``lora_linear_mixed`` (public) → ``torch.ops.peft_kernels.lora_linear_mixed`` → backend chosen by
``ops/_dispatch.py``. The semantics are stated in ``backends/reference/lora_mixed.py``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..backends.reference import lora_mixed as _reference
from . import _dispatch
from ._library import define_op
from .lora import _check_shapes, _needs_autograd


def _mixed_fake(x, weight, bias, lora_a, lora_b, lora_b_bias, scaling, row_adapter):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D (M, K), got {tuple(x.shape)}")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[1], lambda: "weight must be (N, K)")
    n = len(lora_a)
    torch._check(len(lora_b) == n and len(lora_b_bias) == n and len(scaling) == n, lambda: "adapter list lengths")
    torch._check(row_adapter.dim() == 1 and row_adapter.shape[0] == x.shape[0], lambda: "row_adapter must be (M,)")
    return x.new_empty((x.shape[0], weight.shape[0]))


define_op("lora_linear_mixed", _mixed_fake)


def _call(*args):
    return torch.ops.peft_kernels.lora_linear_mixed(*args)


def lora_linear_mixed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a_list: Sequence[torch.Tensor],
    lora_b_list: Sequence[torch.Tensor],
    scaling_list: Sequence[float],
    row_adapter: torch.Tensor,
    backend: Optional[str] = None,
    lora_b_bias_list: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """y[i] = x[i]·Wᵀ + b + s_g·(x[i]·A_gᵀ·B_gᵀ + b_Bg) with g = row_adapter[i]; g = -1: y[i] = x[i]·Wᵀ + b.

    Args:
        x: (M, K), or (B, *, K) where every position of sample i takes sample i's adapter.
        weight: (N, K).  bias: (N,) or None.
        lora_a_list: n tensors (r_a, K).  lora_b_list: n tensors (N, r_a); ranks may differ.
        scaling_list: n floats.  lora_b_bias_list: n tensors (N,) or None (PEFT's ``lora_bias``).
        row_adapter: integer tensor with x.shape[0] entries, each in [-1, n) (-1: the base layer alone).
        backend: "reference", "triton", "cuda" or None (then ``PEFT_KERNELS_BACKEND``, then the best available).
    Returns: x.shape[:-1] + (N,), x's dtype.

    Inference op: with gradients required it runs the reference's differentiable torch ops instead.
    """
    n = len(lora_a_list)
    lora_b_bias_list = [None] * n if lora_b_bias_list is None else list(lora_b_bias_list)
    if not (len(lora_b_list) == n and len(scaling_list) == n and len(lora_b_bias_list) == n):
        raise ValueError(
            f"lora_a_list, lora_b_list, scaling_list and lora_b_bias_list must have one entry per adapter, got "
            f"{n}, {len(lora_b_list)}, {len(scaling_list)} and {len(lora_b_bias_list)}"
        )
    _check_shapes(x, weight, bias, lora_a_list, lora_b_list, [0.0] * n)
    rows = _rows_per_sample(x, row_adapter, n)
    x2d = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if rows > 1:
        row_adapter = row_adapter.repeat_interleave(rows)
    args = (
        x2d,
        weight,
        bias,
        list(lora_a_list),
        list(lora_b_list),
        lora_b_bias_list,
        [float(s) for s in scaling_list],
    )
    if _needs_autograd(x, weight, bias, *lora_a_list, *lora_b_list, *lora_b_bias_list):
        y = _reference.lora_linear_mixed(*args, row_adapter)
    else:
        y = _dispatch.run_with_backend(backend, _call, *args, row_adapter)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def _rows_per_sample(x: torch.Tensor, row_adapter: torch.Tensor, n: int) -> int:
    """Rows of x2d per entry of row_adapter; raises ValueError naming the bad shape, dtype or index."""
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions (M, K), got shape {tuple(x.shape)}")
    if row_adapter.dim() != 1 or row_adapter.shape[0] != x.shape[0]:
        raise ValueError(
            f"row_adapter must have one entry per sample of x (shape ({x.shape[0]},)), got {tuple(row_adapter.shape)}"
        )
    if row_adapter.dtype.is_floating_point or row_adapter.dtype.is_complex or row_adapter.dtype == torch.bool:
        raise ValueError(f"row_adapter must be an integer tensor, got {row_adapter.dtype}")
    if row_adapter.device != x.device:
        raise ValueError(f"row_adapter is on {row_adapter.device} but x is on {x.device}")
    if row_adapter.device.type == "cpu" and row_adapter.numel() and not torch.compiler.is_compiling():
        # Checked where it costs no device sync (and eagerly: a value check breaks a compiled graph); elsewhere an
        # index outside [-1, n) selects no adapter.
        low, high = (int(v) for v in torch.aminmax(row_adapter))
        if low < -1 or high >= n:
            bad = low if low < -1 else high
            raise ValueError(f"row_adapter holds {bad}, outside [-1, {n}) for {n} adapters")
    return math.prod(x.shape[1:-1])
