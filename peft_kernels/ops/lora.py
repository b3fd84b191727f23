"""LoRA linear: one pair of registered ops for every base-weight format, and one autograd Function.

Route (the same on every device)::

    lora_linear / lora_linear_multi / lora_linear_int8 / lora_linear_int8_multi          (public, this module)
      → LoraLinearFunction (autograd; LoraLinearInt8Function is the same with the int8 argument order)
      → torch.ops.peft_kernels.lora_linear_fwd / lora_linear_bwd                           (schema: backends/)
      → ops/_dispatch.run: the cached choice of the op's table → backends/<name>/lora.py

A call that needs no autograd, with one adapter and no dropout (every decode step), takes the op's inference form
instead: ``torch.ops.peft_kernels.lora_linear_inference`` (scalar arguments, x (*, K) as given, y only). On CPU
each list argument and each reshape costs the call a few µs (docs/KERNELS.md §8); a backend without its own
kernel for it runs ``lora_linear_fwd`` on the translated call (``_dispatch.DERIVED``).

The base weight is ``weight`` plus an optional ``weight_scale``: a float weight, or int8 with per-row fp32 scales
(W8A16); ``peft_kernels/formats.py`` owns the formats and says how a new one (4-bit NF4/FP4) plugs in: a
``dequantize_*`` there, the reference through it, the kernels' checks; this module, the Function and the
dispatcher stay as they are. ``torch.ops.peft_kernels.lora_linear_int8_fwd`` / ``_bwd`` are aliases of the two
ops with the int8 argument order (x, weight_int8, weight_scale, …), kept for their callers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..backends import bind
from ..backends.reference.lora import inference_as_forward, inference_output
from ..formats import weight_format_error
from . import _dispatch
from ._library import define_alias, define_op

# Tensors per adapter in the Functions' flattened argument list: lora_a, lora_b, lora_b_bias.
_TENSORS_PER_ADAPTER = 3


def _check_weight_fake(x, weight, weight_scale) -> None:
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1], lambda: "weight must be (N, K)")
    if weight_scale is not None:
        torch._check(weight.dtype == torch.int8, lambda: f"weight_int8 must be int8, got {weight.dtype}")
        torch._check(
            weight_scale.dtype == torch.float32 and tuple(weight_scale.shape) == (weight.shape[0],),
            lambda: f"weight_scale must be fp32 ({weight.shape[0]},), got {tuple(weight_scale.shape)}",
        )


def _fwd_fake(*args, **kwargs):
    call = bind("lora_linear_fwd", args)._replace(**kwargs)
    x, weight = call.x, call.weight
    torch._check(x.dim() == 2, lambda: f"x must be 2-D (M, K), got {tuple(x.shape)}")
    _check_weight_fake(x, weight, call.weight_scale)
    n = len(call.lora_a)
    torch._check(
        len(call.lora_b) == n and len(call.scaling) == n and len(call.dropout_p) == n, lambda: "adapter list lengths"
    )
    return x.new_empty((x.shape[0], weight.shape[0])), saved_fake(x, call.lora_a, call.dropout_p)


def saved_fake(x, lora_a, dropout_p) -> list[torch.Tensor]:
    """The forward ops' second output, as fake tensors: [S_a] (M, r_a) in acc_a, then the kept masks where the
    backend that runs keeps them (on CPU the automatic choice is the reference, which does:
    ``reference.lora.keeps_masks``). Shared by every weight format's forward op."""
    from ..backends.reference.lora import keeps_masks

    saved = [x.new_empty((x.shape[0], a.shape[0]), dtype=torch.promote_types(a.dtype, torch.float32)) for a in lora_a]
    if _dispatch.forced_backend() in (None, "reference") and keeps_masks(x):
        saved += [x.new_empty(x.shape, dtype=torch.bool) for p in dropout_p if p > 0.0]
    return saved


def _bwd_fake(*args, **kwargs):
    call = bind("lora_linear_bwd", args)._replace(**kwargs)
    need_dx, need_adapters = call.output_mask
    dx = torch.empty_like(call.x, memory_format=torch.contiguous_format) if need_dx else None
    d_a = [torch.empty_like(a, memory_format=torch.contiguous_format) for a in call.lora_a] if need_adapters else []
    d_b = [torch.empty_like(b, memory_format=torch.contiguous_format) for b in call.lora_b] if need_adapters else []
    return dx, d_a, d_b


def _inference_fake(*args, **kwargs):
    call = bind("lora_linear_inference", args)._replace(**kwargs)
    _check_weight_fake(call.x, call.weight, call.weight_scale)
    return call.x.new_empty((*call.x.shape[:-1], call.weight.shape[0]))


define_op("lora_linear_fwd", _fwd_fake)
define_op("lora_linear_inference", _inference_fake)
define_op("lora_linear_bwd", _bwd_fake)
_dispatch.DERIVED["lora_linear_inference"] = ("lora_linear_fwd", inference_as_forward, inference_output)
define_alias(
    "lora_linear_int8_fwd",
    "lora_linear_fwd",
    ("x", "weight", "weight_scale", "bias", "lora_a", "lora_b", "lora_b_bias", "scaling", "dropout_p", "seeds"),
)
define_alias(
    "lora_linear_int8_bwd",
    "lora_linear_bwd",
    ("dy", "x", "weight", "weight_scale", "lora_a", "lora_b", "saved_s", "scaling", "dropout_p", "seeds",
     "output_mask"),
)  # fmt: skip


def _forward(ctx, meta, x, weight, weight_scale, bias, seeds, adapter_tensors):
    scaling, dropout_p = meta
    lora_a = list(adapter_tensors[0::_TENSORS_PER_ADAPTER])
    lora_b = list(adapter_tensors[1::_TENSORS_PER_ADAPTER])
    lora_b_bias = list(adapter_tensors[2::_TENSORS_PER_ADAPTER])
    forced = _dispatch.forced_backend()
    # saved: [S_a], then the dropout masks where the backend keeps them (the reference on CPU), else nothing more.
    y, saved = torch.ops.peft_kernels.lora_linear_fwd(
        x, weight, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds, weight_scale
    )
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.forced_backend = forced
    ctx.n_adapters = len(lora_a)
    ctx.has_bias = bias is not None
    ctx.lora_b_bias_present = [t is not None for t in lora_b_bias]
    ctx.save_for_backward(x, weight, weight_scale, seeds, *lora_a, *lora_b, *saved)
    return y


def _backward(ctx, dy, leading: int):
    """(dx, dW or None, db, adapter gradients); ``leading`` = the Function's inputs before the adapter tensors."""
    n = ctx.n_adapters
    x, weight, weight_scale, seeds, *rest = ctx.saved_tensors
    lora_a, lora_b, saved = rest[:n], rest[n : 2 * n], rest[2 * n :]
    needs = ctx.needs_input_grad
    adapter_needs = needs[leading:]
    need_adapters = any(adapter_needs[i] or adapter_needs[i + 1] for i in range(0, _TENSORS_PER_ADAPTER * n, 3))
    dx, d_a, d_b = _dispatch.run_with_backend(
        ctx.forced_backend,
        torch.ops.peft_kernels.lora_linear_bwd,
        dy, x, weight, lora_a, lora_b, saved, ctx.scaling, ctx.dropout_p, seeds, [needs[1], need_adapters],
        weight_scale,
    )  # fmt: skip
    # dW only for a float weight that trains (full fine-tuning); a quantized base never does.
    d_weight = dy.t().mm(x.to(dy.dtype)).to(weight.dtype) if weight_scale is None and needs[2] else None
    d_bias = dy.sum(0) if needs[leading - 2] and ctx.has_bias else None
    adapter_grads = []
    for i in range(n):
        ga = d_a[i] if adapter_needs[3 * i] else None
        gb = d_b[i] if adapter_needs[3 * i + 1] else None
        gbb = dy.sum(0) * ctx.scaling[i] if ctx.lora_b_bias_present[i] and adapter_needs[3 * i + 2] else None
        adapter_grads += [ga, gb, gbb]
    return dx, d_weight, d_bias, adapter_grads


class LoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + Σ_a s_a·(drop_a(x)·A_aᵀ·B_aᵀ + b_Ba), x of shape (M, K).

    Chain rule (dY = ∂L/∂y)::

        dx = dY·W + Σ_a m_a ⊙ (s_a·dY·B_a·A_a)/(1-p_a)     dW = dYᵀ·x (only if W trains)     db = Σ_m dY
        dA_a = (s_a·dY·B_a)ᵀ·x̂_a     dB_a = s_a·dYᵀ·S_a     db_Ba = s_a·Σ_m dY

    Saved: x and the parameters (references, no copies), S_a (M×r_a, fp32) and the seeds; the 1-byte dropout
    masks only where the forward op kept them (CPU); never x̂. ``meta`` = (scaling, dropout_p) comes first
    because the adapter tensors are variadic (``*adapter_tensors`` = A_1, B_1, b_B1, A_2, …) so that autograd
    sees each one as an input.
    """

    @staticmethod
    def forward(ctx, meta, x, weight, bias, seeds, *adapter_tensors):
        return _forward(ctx, meta, x, weight, None, bias, seeds, adapter_tensors)

    @staticmethod
    def backward(ctx, dy):
        dx, d_weight, d_bias, adapter_grads = _backward(ctx, dy, leading=5)
        return (None, dx, d_weight, d_bias, None, *adapter_grads)


class LoraLinearInt8Function(torch.autograd.Function):
    """``LoraLinearFunction`` on an int8 base: W = weight_int8 · weight_scale[:, None] (frozen: no dW).

    Inputs: meta, x, weight_int8, weight_scale, bias, seeds, *adapter tensors (``weight`` replaced by the pair).
    """

    @staticmethod
    def forward(ctx, meta, x, weight_int8, weight_scale, bias, seeds, *adapter_tensors):
        return _forward(ctx, meta, x, weight_int8, weight_scale, bias, seeds, adapter_tensors)

    @staticmethod
    def backward(ctx, dy):
        dx, _, d_bias, adapter_grads = _backward(ctx, dy, leading=6)
        return (None, dx, None, None, d_bias, None, *adapter_grads)


def _dropout_args(dropout_p, training: bool, device: torch.device) -> tuple[list[float], torch.Tensor | None]:
    """(the p that apply: dropout_p when training, else zeros; one int64 Philox seed per adapter from torch's
    generator when any p > 0 applies: on device, no host sync, reproducible)."""
    if not training:
        return [0.0] * len(dropout_p), None
    p_eff = [float(p) for p in dropout_p]
    if not any(p > 0.0 for p in p_eff):
        return p_eff, None
    return p_eff, torch.randint(0, 2**62, (len(p_eff),), device=device, dtype=torch.int64)


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
    weight_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + Σ_a s_a·(drop_a(x)·A_aᵀ·B_aᵀ + b_Ba) for several active adapters, x of shape (*, K).

    W = weight (N, K), or weight_int8 · weight_scale[:, None] when ``weight_scale`` (N,) fp32 is given (int8 base,
    ``formats.py``). Dropout applies only when ``training``.
    """
    _check_shapes(x, weight, bias, lora_a, lora_b, dropout_p)
    if weight_scale is not None and (error := weight_format_error(weight, weight_scale)) is not None:
        raise ValueError(error)
    p_eff, seeds = _dropout_args(dropout_p, training, x.device)
    scaling = [float(s) for s in scaling]
    needs_autograd = _needs_autograd(x, weight, bias, *lora_a, *lora_b, *lora_b_bias)
    if not needs_autograd and len(lora_a) == 1 and p_eff[0] == 0.0:
        # Inference with one adapter (every decode step): the lean op, on x as given (*, K).
        return _dispatch.run_with_backend(
            backend, torch.ops.peft_kernels.lora_linear_inference,
            x, weight, bias, lora_a[0], lora_b[0], scaling[0], lora_b_bias[0], weight_scale,
        )  # fmt: skip
    flat = x.dim() == 2
    x2d = x if flat else x.reshape(-1, x.shape[-1])
    if needs_autograd:
        adapter_tensors = []
        for a, b, bb in zip(lora_a, lora_b, lora_b_bias):
            adapter_tensors += [a, b, bb]
        meta = (scaling, p_eff)
        if weight_scale is None:
            args = (LoraLinearFunction.apply, meta, x2d, weight, bias, seeds, *adapter_tensors)
        else:
            args = (LoraLinearInt8Function.apply, meta, x2d, weight, weight_scale, bias, seeds, *adapter_tensors)
        y = _dispatch.run_with_backend(backend, *args)
    else:
        # Inference: nothing to save, no autograd node; the forward op alone.
        y, _ = _dispatch.run_with_backend(
            backend, torch.ops.peft_kernels.lora_linear_fwd,
            x2d, weight, bias, list(lora_a), list(lora_b), list(lora_b_bias), scaling, p_eff, seeds, weight_scale,
        )  # fmt: skip
    return y if flat else y.reshape(*x.shape[:-1], weight.shape[0])


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
    weight_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + scaling·(drop(x)·lora_aᵀ·lora_bᵀ + lora_b_bias).

    Args:
        x: (*, K).  weight: (N, K).  bias: (N,) or None.  lora_a: (r, K).  lora_b: (N, r).
        scaling: s.  dropout_p: p in [0, 1), applied to the LoRA input only, only when ``training``.
        backend: "reference", "triton", "cuda" or None (then ``PEFT_KERNELS_BACKEND``, then the best available).
        weight_scale: None (float weight), or (N,) fp32 for an int8 ``weight``: W = weight · weight_scale[:, None].
    Returns: (*, N) in x's dtype.
    """
    return lora_linear_multi(
        x, weight, bias, [lora_a], [lora_b], [lora_b_bias], [scaling], [dropout_p], training, backend, weight_scale
    )


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
    """``lora_linear_multi`` on an int8 base: W = weight_int8 · weight_scale[:, None] (int8 (N, K), fp32 (N,))."""
    if weight_scale is None or (error := weight_format_error(weight_int8, weight_scale)) is not None:
        raise ValueError(error or "weight_scale is required for an int8 weight")
    return lora_linear_multi(
        x, weight_int8, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, training, backend, weight_scale
    )


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
        x, weight_int8, weight_scale, bias, [lora_a], [lora_b], [lora_b_bias], [scaling], [dropout_p], training,
        backend,
    )  # fmt: skip


def _check_shapes(x, weight, bias, lora_a, lora_b, dropout_p) -> None:
    # Each shape read once (a Tensor.shape access builds a torch.Size): this runs per layer per token.
    weight_shape = weight.shape
    if len(weight_shape) != 2 or x.shape[-1] != weight_shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight has shape {tuple(weight_shape)} (expected (N, K))")
    n_out, n_in = weight_shape
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n_out},)")
    for a, b, p in zip(lora_a, lora_b, dropout_p):
        a_shape = a.shape
        if len(a_shape) != 2 or a_shape[1] != n_in:
            raise ValueError(f"lora_a has shape {tuple(a_shape)}, expected (r, {n_in})")
        if b.shape != (n_out, a_shape[0]):
            raise ValueError(f"lora_b has shape {tuple(b.shape)}, expected ({n_out}, {a_shape[0]})")
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {p}")
