"""LoRA linear on an int8 weight-only base (W8A16) as registered ops plus one autograd Function.

``lora_linear_int8`` (public) → ``LoraLinearInt8Function`` → ``torch.ops.peft_kernels.lora_linear_int8_{fwd,bwd}``
→ backend chosen by ``ops/_dispatch.py``. The weight format (``W ≈ weight_int8 · weight_scale[:, None]``, for
bitsandbytes ``weight_int8 = CB``, ``weight_scale = SCB · 7.874015718698502e-3``) is stated in
``backends/reference/lora_int8.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _dispatch
from ._library import define_op
from .lora import _LEADING_INPUTS, _TENSORS_PER_ADAPTER, _bwd_fake, _check_shapes, _draw_seeds, _fwd_fake


def _int8_fwd_fake(x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds):
    _check_int8_weight(weight_int8, weight_scale)
    return _fwd_fake(x, weight_int8, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds)


def _int8_bwd_fake(dy, x, weight_int8, weight_scale, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, output_mask):
    _check_int8_weight(weight_int8, weight_scale)
    return _bwd_fake(dy, x, weight_int8, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, output_mask)


def _check_int8_weight(weight_int8, weight_scale) -> None:
    torch._check(weight_int8.dtype == torch.int8, lambda: f"weight_int8 must be int8, got {weight_int8.dtype}")
    torch._check(weight_int8.dim() == 2, lambda: f"weight_int8 must be (N, K), got {tuple(weight_int8.shape)}")
    torch._check(weight_scale.dtype == torch.float32, lambda: f"weight_scale must be fp32, got {weight_scale.dtype}")
    torch._check(
        weight_scale.dim() == 1 and weight_scale.shape[0] == weight_int8.shape[0],
        lambda: f"weight_scale must be ({weight_int8.shape[0]},), got {tuple(weight_scale.shape)}",
    )


define_op(
    "lora_linear_int8_fwd",
    "(Tensor x, Tensor weight_int8, Tensor weight_scale, Tensor? bias, Tensor[] lora_a, Tensor[] lora_b, "
    "Tensor?[] lora_b_bias, float[] scaling, float[] dropout_p, Tensor? seeds) -> (Tensor, Tensor[])",
    _int8_fwd_fake,
)
define_op(
    "lora_linear_int8_bwd",
    "(Tensor dy, Tensor x, Tensor weight_int8, Tensor weight_scale, Tensor[] lora_a, Tensor[] lora_b, "
    "Tensor[] saved_s, float[] scaling, float[] dropout_p, Tensor? seeds, bool[] output_mask) "
    "-> (Tensor?, Tensor[], Tensor[])",
    _int8_bwd_fake,
)

# Non-adapter inputs of LoraLinearInt8Function.forward after ctx: meta, x, weight_int8, weight_scale, bias, seeds.
_INT8_LEADING_INPUTS = _LEADING_INPUTS + 1


class LoraLinearInt8Function(torch.autograd.Function):
    """y = x·W_deqᵀ + b + Σ_a s_a·(drop_a(x)·A_aᵀ·B_aᵀ + b_Ba), W_deq = weight_int8 · weight_scale[:, None].

    Chain rule (dY = ∂L/∂y; the int8 weight and its scale are frozen, so no dW)::

        dx = dY·W_deq + Σ_a m_a ⊙ (s_a·dY·B_a·A_a)/(1-p_a)     db = Σ_m dY
        dA_a = (s_a·dY·B_a)ᵀ·x̂_a     dB_a = s_a·dYᵀ·S_a     db_Ba = s_a·Σ_m dY

    Saved: x, weight_int8, weight_scale and the adapters (references), S_a (M×r_a, fp32) and the seeds.
    Argument order as ``LoraLinearFunction`` with ``weight`` replaced by ``weight_int8, weight_scale``.
    """

    @staticmethod
    def forward(ctx, meta, x, weight_int8, weight_scale, bias, seeds, *adapter_tensors):
        scaling, dropout_p = meta
        lora_a = list(adapter_tensors[0::_TENSORS_PER_ADAPTER])
        lora_b = list(adapter_tensors[1::_TENSORS_PER_ADAPTER])
        lora_b_bias = list(adapter_tensors[2::_TENSORS_PER_ADAPTER])
        y, saved_s = torch.ops.peft_kernels.lora_linear_int8_fwd(
            x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds
        )
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        ctx.n_adapters = len(lora_a)
        ctx.forced_backend = _dispatch.forced_backend()
        ctx.has_bias = bias is not None
        ctx.lora_b_bias_present = [t is not None for t in lora_b_bias]
        ctx.save_for_backward(x, weight_int8, weight_scale, seeds, *lora_a, *lora_b, *saved_s)
        return y

    @staticmethod
    def backward(ctx, dy):
        n = ctx.n_adapters
        x, weight_int8, weight_scale, seeds, *rest = ctx.saved_tensors
        lora_a, lora_b, saved_s = rest[:n], rest[n : 2 * n], rest[2 * n :]
        needs = ctx.needs_input_grad
        adapter_needs = needs[_INT8_LEADING_INPUTS:]
        need_adapters = any(adapter_needs[i] or adapter_needs[i + 1] for i in range(0, _TENSORS_PER_ADAPTER * n, 3))
        dx, d_a, d_b = _dispatch.run_with_backend(
            ctx.forced_backend,
            torch.ops.peft_kernels.lora_linear_int8_bwd,
            dy,
            x,
            weight_int8,
            weight_scale,
            lora_a,
            lora_b,
            saved_s,
            ctx.scaling,
            ctx.dropout_p,
            seeds,
            [needs[1], need_adapters],
        )
        d_bias = dy.sum(0) if needs[4] and ctx.has_bias else None
        adapter_grads = []
        for i in range(n):
            ga = d_a[i] if adapter_needs[3 * i] else None
            gb = d_b[i] if adapter_needs[3 * i + 1] else None
            gbb = dy.sum(0) * ctx.scaling[i] if ctx.lora_b_bias_present[i] and adapter_needs[3 * i + 2] else None
            adapter_grads += [ga, gb, gbb]
        # Inputs: meta, x, weight_int8, weight_scale, bias, seeds, *adapters; the int8 base never trains.
        return (None, dx, None, None, d_bias, None, *adapter_grads)


def lora_linear_int8_multi(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    lora_b_bias: Sequence[torch.Tensor | None],
    scaling: Sequence[float],
    dropout_p: Sequence[float],
    training: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x·W_deqᵀ + b + Σ_a s_a·(drop_a(x)·A_aᵀ·B_aᵀ + b_Ba) for several active adapters, x of shape (*, K).

    W_deq = weight_int8 · weight_scale[:, None] (int8 (N, K), fp32 (N,)). Dropout applies only when ``training``.
    """
    _check_shapes(x, weight_int8, bias, lora_a, lora_b, dropout_p)
    if weight_int8.dtype != torch.int8:
        raise ValueError(f"weight_int8 must be int8, got {weight_int8.dtype}")
    if weight_scale.dtype != torch.float32 or weight_scale.shape != (weight_int8.shape[0],):
        raise ValueError(
            f"weight_scale must be fp32 of shape ({weight_int8.shape[0]},), got {weight_scale.dtype} "
            f"{tuple(weight_scale.shape)} (for bitsandbytes: SCB * 7.874015718698502e-3)"
        )
    lead_shape = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    p_eff = [float(p) if training else 0.0 for p in dropout_p]
    seeds = _draw_seeds(len(lora_a), x.device) if any(p > 0.0 for p in p_eff) else None
    adapter_tensors = []
    for a, b, bb in zip(lora_a, lora_b, lora_b_bias):
        adapter_tensors += [a, b, bb]
    meta = ([float(s) for s in scaling], p_eff)
    y = _dispatch.run_with_backend(
        backend, LoraLinearInt8Function.apply, meta, x2d, weight_int8, weight_scale, bias, seeds, *adapter_tensors
    )
    return y.reshape(*lead_shape, weight_int8.shape[0])


def lora_linear_int8(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str | None = None,
    lora_b_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x·W_deqᵀ + b + scaling·(drop(x)·lora_aᵀ·lora_bᵀ + lora_b_bias), W_deq = weight_int8·weight_scale[:, None].

    Args:
        x: (*, K) fp16/bf16 (fp32/fp64 on the reference).  weight_int8: (N, K) int8.  weight_scale: (N,) fp32.
        bias: (N,) in x's dtype, or None.  lora_a: (r, K).  lora_b: (N, r).
        scaling: s.  dropout_p: p in [0, 1), applied to the LoRA input only, only when ``training``.
        backend: "reference", "triton", "cuda" or None (then ``PEFT_KERNELS_BACKEND``, then the best available).
    Returns: (*, N) in x's dtype. No gradient flows to ``weight_int8`` or ``weight_scale``.
    """
    return lora_linear_int8_multi(
        x,
        weight_int8,
        weight_scale,
        bias,
        [lora_a],
        [lora_b],
        [lora_b_bias],
        [scaling],
        [dropout_p],
        training,
        backend,
    )
