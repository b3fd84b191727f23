"""LoRA linear as registered ops plus one autograd Function.

``lora_linear`` (public) → ``LoraLinearFunction`` (saves x, W, A, B, S and a seed; never an M×N or M×K tensor)
→ ``torch.ops.peft_kernels.lora_linear_{fwd,bwd}`` → backend chosen by ``ops/_dispatch.py``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..backends.reference import lora as _reference
from . import _dispatch
from ._library import define_op

# Tensors per adapter in LoraLinearFunction's flattened argument list: lora_a, lora_b, lora_b_bias.
_TENSORS_PER_ADAPTER = 3
# Non-adapter inputs of LoraLinearFunction.forward after ctx: meta, x, weight, bias, seeds.
_LEADING_INPUTS = 5


def _fwd_fake(x, weight, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D (M, K), got {tuple(x.shape)}")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[1], lambda: "weight must be (N, K)")
    n = len(lora_a)
    torch._check(len(lora_b) == n and len(scaling) == n and len(dropout_p) == n, lambda: "adapter list lengths")
    y = x.new_empty((x.shape[0], weight.shape[0]))
    s = [x.new_empty((x.shape[0], a.shape[0]), dtype=torch.promote_types(a.dtype, torch.float32)) for a in lora_a]
    return y, s


def _bwd_fake(dy, x, weight, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, output_mask):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else None
    d_a = [torch.empty_like(a, memory_format=torch.contiguous_format) for a in lora_a] if output_mask[1] else []
    d_b = [torch.empty_like(b, memory_format=torch.contiguous_format) for b in lora_b] if output_mask[1] else []
    return dx, d_a, d_b


define_op(
    "lora_linear_fwd",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor[] lora_a, Tensor[] lora_b, Tensor?[] lora_b_bias, "
    "float[] scaling, float[] dropout_p, Tensor? seeds) -> (Tensor, Tensor[])",
    _fwd_fake,
)
define_op(
    "lora_linear_bwd",
    "(Tensor dy, Tensor x, Tensor weight, Tensor[] lora_a, Tensor[] lora_b, Tensor[] saved_s, float[] scaling, "
    "float[] dropout_p, Tensor? seeds, bool[] output_mask) -> (Tensor?, Tensor[], Tensor[])",
    _bwd_fake,
)


def _eager_cpu(x: torch.Tensor) -> bool:
    """Eager call on CPU tensors with automatic backend choice: the op's CPU kernel is the reference anyway, so
    calling it directly skips the dispatcher round trip (≈45 µs per call measured on the 2-core CI box, more than
    the whole layer costs at decode sizes). Compiled graphs and forced backends always go through torch.ops."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and _dispatch.forced_backend() is None


def _call_fwd(*args):
    if _eager_cpu(args[0]):
        return _reference.lora_linear_fwd(*args)
    return torch.ops.peft_kernels.lora_linear_fwd(*args)


def _call_bwd(*args):
    if _eager_cpu(args[1]):
        return _reference.lora_linear_bwd(*args)
    return torch.ops.peft_kernels.lora_linear_bwd(*args)


class LoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + Σ_a s_a·(drop_a(x)·A_aᵀ·B_aᵀ + b_Ba), x of shape (M, K).

    Chain rule (dY = ∂L/∂y)::

        dx = dY·W + Σ_a m_a ⊙ (s_a·dY·B_a·A_a)/(1-p_a)     dW = dYᵀ·x (only if W trains)     db = Σ_m dY
        dA_a = (s_a·dY·B_a)ᵀ·x̂_a     dB_a = s_a·dYᵀ·S_a     db_Ba = s_a·Σ_m dY

    Saved: x and the parameters (references, no copies), S_a (M×r_a, fp32) and the seeds: no mask, no x̂.
    ``meta`` = (scaling, dropout_p) comes first because the adapter tensors are variadic
    (``*adapter_tensors`` = A_1, B_1, b_B1, A_2, …) so that autograd sees each one as an input.
    """

    @staticmethod
    def forward(ctx, meta, x, weight, bias, seeds, *adapter_tensors):
        scaling, dropout_p = meta
        lora_a = list(adapter_tensors[0::_TENSORS_PER_ADAPTER])
        lora_b = list(adapter_tensors[1::_TENSORS_PER_ADAPTER])
        lora_b_bias = list(adapter_tensors[2::_TENSORS_PER_ADAPTER])
        keep_masks = None
        if seeds is not None and _eager_cpu(x):
            # Eager CPU with dropout: draw the masks once and keep them (1 byte per element) instead of
            # regenerating them in backward; see backends/reference/lora.py cpu_keep_masks for the measurement.
            keep_masks = _reference.cpu_keep_masks(x, dropout_p, seeds)
            y, saved_s = _reference.lora_linear_fwd(
                x, weight, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds, keep_masks=keep_masks
            )
        else:
            y, saved_s = _call_fwd(x, weight, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds)
        ctx.mask_slots = [m is not None for m in keep_masks] if keep_masks is not None else None
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        ctx.forced_backend = _dispatch.forced_backend()
        ctx.n_adapters = len(lora_a)
        ctx.has_bias = bias is not None
        ctx.lora_b_bias_present = [t is not None for t in lora_b_bias]
        stored_masks = [m for m in keep_masks if m is not None] if keep_masks is not None else []
        ctx.save_for_backward(x, weight, seeds, *lora_a, *lora_b, *saved_s, *stored_masks)
        return y

    @staticmethod
    def backward(ctx, dy):
        n = ctx.n_adapters
        x, weight, seeds, *rest = ctx.saved_tensors
        lora_a, lora_b, saved_s = rest[:n], rest[n : 2 * n], rest[2 * n : 3 * n]
        keep_masks = None
        if ctx.mask_slots is not None:
            stored = iter(rest[3 * n :])
            keep_masks = [next(stored) if present else None for present in ctx.mask_slots]
        needs = ctx.needs_input_grad
        adapter_needs = needs[_LEADING_INPUTS:]
        need_adapters = any(adapter_needs[i] or adapter_needs[i + 1] for i in range(0, 3 * n, 3))
        output_mask = [needs[1], need_adapters]
        if keep_masks is not None:
            dx, d_a, d_b = _reference.lora_linear_bwd(
                dy,
                x,
                weight,
                lora_a,
                lora_b,
                saved_s,
                ctx.scaling,
                ctx.dropout_p,
                seeds,
                output_mask,
                keep_masks=keep_masks,
            )
        else:
            dx, d_a, d_b = _dispatch.run_with_backend(
                ctx.forced_backend,
                _call_bwd,
                dy, x, weight, lora_a, lora_b, saved_s, ctx.scaling, ctx.dropout_p, seeds, output_mask,
            )  # fmt: skip
        d_weight = dy.t().mm(x.to(dy.dtype)).to(weight.dtype) if needs[2] else None
        d_bias = dy.sum(0).to(dy.dtype) if needs[3] and ctx.has_bias else None
        adapter_grads = []
        for i in range(n):
            ga = d_a[i] if adapter_needs[3 * i] else None
            gb = d_b[i] if adapter_needs[3 * i + 1] else None
            gbb = None
            if ctx.lora_b_bias_present[i] and adapter_needs[3 * i + 2]:
                gbb = dy.sum(0) * ctx.scaling[i]
            adapter_grads += [ga, gb, gbb]
        return (None, dx, d_weight, d_bias, None, *adapter_grads)


def _draw_seeds(n: int, device: torch.device) -> torch.Tensor:
    """One int64 Philox seed per adapter from torch's generator: on device, no host sync, reproducible."""
    return torch.randint(0, 2**62, (n,), device=device, dtype=torch.int64)


def lora_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    lora_b_bias: Sequence[Optional[torch.Tensor]],
    scaling: Sequence[float],
    dropout_p: Sequence[float],
    training: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + Σ_a s_a·(drop_a(x)·A_aᵀ·B_aᵀ + b_Ba) for several active adapters, x of shape (*, K).

    Dropout applies only when ``training``; the mask is regenerated from a seed in backward.
    """
    _check_shapes(x, weight, bias, lora_a, lora_b, dropout_p)
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    p_eff = [float(p) if training else 0.0 for p in dropout_p]
    seeds = _draw_seeds(len(lora_a), x.device) if any(p > 0.0 for p in p_eff) else None
    scaling = [float(s) for s in scaling]
    if _needs_autograd(x, weight, bias, *lora_a, *lora_b, *lora_b_bias):
        adapter_tensors = []
        for a, b, bb in zip(lora_a, lora_b, lora_b_bias):
            adapter_tensors += [a, b, bb]
        y = _dispatch.run_with_backend(
            backend, LoraLinearFunction.apply, (scaling, p_eff), x2d, weight, bias, seeds, *adapter_tensors
        )
    else:
        # Inference: nothing to save, no autograd node; the forward op alone.
        y, _ = _dispatch.run_with_backend(
            backend, _call_fwd, x2d, weight, bias, list(lora_a), list(lora_b), list(lora_b_bias), scaling, p_eff, seeds
        )
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: Optional[str] = None,
    lora_b_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + scaling·(drop(x)·lora_aᵀ·lora_bᵀ + lora_b_bias).

    Args:
        x: (*, K).  weight: (N, K).  bias: (N,) or None.  lora_a: (r, K).  lora_b: (N, r).
        scaling: s.  dropout_p: p in [0, 1), applied to the LoRA input only, only when ``training``.
        backend: "reference", "triton", "cuda" or None (then ``PEFT_KERNELS_BACKEND``, then the best available).
    Returns: (*, N) in x's dtype.
    """
    return lora_linear_multi(
        x, weight, bias, [lora_a], [lora_b], [lora_b_bias], [scaling], [dropout_p], training, backend
    )


def _check_shapes(x, weight, bias, lora_a, lora_b, dropout_p) -> None:
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight has shape {tuple(weight.shape)} (expected (N, K))")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    for a, b, p in zip(lora_a, lora_b, dropout_p):
        if a.dim() != 2 or a.shape[1] != weight.shape[1]:
            raise ValueError(f"lora_a has shape {tuple(a.shape)}, expected (r, {weight.shape[1]})")
        if b.dim() != 2 or b.shape != (weight.shape[0], a.shape[0]):
            raise ValueError(f"lora_b has shape {tuple(b.shape)}, expected ({weight.shape[0]}, {a.shape[0]})")
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {p}")
