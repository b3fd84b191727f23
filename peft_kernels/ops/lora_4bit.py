"""LoRA linear on a bitsandbytes 4-bit (NF4 / FP4) base as registered ops plus one autograd Function.

``lora_linear_4bit`` (public) → ``LoraLinear4bitFunction`` → ``torch.ops.peft_kernels.lora_linear_4bit_{fwd,bwd}``
→ backend chosen by ``ops/_dispatch.py``. The weight format (packed nibbles, block scales, optional nested scales)
is stated in ``backends/reference/lora_4bit.py``; the schema (``backends.SCHEMAS``) holds only tensors and scalars,
so bitsandbytes is needed only to make the weights. ``quant_operands`` turns a bnb ``QuantState`` into those operands;
``dequantize_4bit`` (the reference's) decodes the whole weight, for merge only.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch

from ..backends import bind
from ..backends.reference.lora_4bit import dequantize_4bit  # noqa: F401 - re-exported for merge (layers)
from . import _dispatch
from ._library import define_op
from .lora import _check_shapes, _dropout_args, _needs_autograd, saved_fake


class Quant4bit(NamedTuple):
    """The op's 4-bit weight operands (backends/reference/lora_4bit.py states the format)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: torch.Tensor | None
    code: torch.Tensor
    blocksize: int
    nested_blocksize: int
    shape: list[int]


def quant_operands(weight: torch.Tensor, quant_state: Any) -> Quant4bit:
    """Quant4bit from bnb's ``quantize_4bit`` output (or a ``Params4bit`` and its ``quant_state``).

    bnb's CPU inference repack (``quant_state.packing_format_for_cpu``, made by ``Linear4bit``'s first no-grad
    forward on AVX512-BF16 CPUs) is another layout; ``layers.lora_4bit`` turns it back before calling this.
    """
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "this 4-bit weight is in bitsandbytes' AVX512-BF16 CPU inference layout (quant_state."
            "packing_format_for_cpu=True); lora_linear_4bit reads the standard quantize_4bit layout. Set "
            "`support_avx512bf16_for_cpu = False` on the Linear4bit before its first forward, or use "
            "peft_kernels.layers.lora_4bit.unpack_cpu_layout."
        )
    shape = [int(s) for s in quant_state.shape]
    if len(shape) != 2:
        raise ValueError(f"lora_linear_4bit needs a 2-D (N, K) weight, quant_state.shape is {tuple(shape)}")
    if quant_state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_state.quant_type!r}")
    packed = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    n_bytes = -(-shape[0] * shape[1] // 2)
    if packed.numel() * packed.element_size() < n_bytes:
        raise ValueError(
            f"packed weight holds {packed.numel() * packed.element_size()} bytes, {shape} needs {n_bytes}"
        )
    code = quant_state.code.to(torch.float32)
    if quant_state.nested:
        state2 = quant_state.state2
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=code.device)
        return Quant4bit(packed, quant_state.absmax, state2.absmax, state2.code, offset, code,
                         int(quant_state.blocksize), int(state2.blocksize), shape)  # fmt: skip
    return Quant4bit(packed, quant_state.absmax, None, None, None, code, int(quant_state.blocksize), 0, shape)


def _check_quant(q: Quant4bit) -> None:
    n, k = q.shape
    blocks = -(-n * k // q.blocksize)
    torch._check(q.code.numel() == 16, lambda: f"code must have 16 entries, got {q.code.numel()}")
    torch._check(q.absmax.numel() == blocks, lambda: f"absmax must have {blocks} entries, got {q.absmax.numel()}")
    torch._check(q.blocksize % 2 == 0, lambda: f"blocksize must be even, got {q.blocksize}")


def _fwd_fake(*args, **kwargs):
    call = bind("lora_linear_4bit_fwd", args)._replace(**kwargs)
    x = call.x
    quant = Quant4bit(*call[1:10])
    _check_quant(quant)
    torch._check(x.dim() == 2 and x.shape[1] == quant.shape[1], lambda: "x must be (M, K) with K = shape[1]")
    return x.new_empty((x.shape[0], quant.shape[0])), saved_fake(x, call.lora_a, call.dropout_p)


def _bwd_fake(*args, **kwargs):
    call = bind("lora_linear_4bit_bwd", args)._replace(**kwargs)
    _check_quant(Quant4bit(*call[2:11]))
    need_dx, need_adapters = call.output_mask
    dx = torch.empty_like(call.x, memory_format=torch.contiguous_format) if need_dx else None
    d_a = [torch.empty_like(a, memory_format=torch.contiguous_format) for a in call.lora_a] if need_adapters else []
    d_b = [torch.empty_like(b, memory_format=torch.contiguous_format) for b in call.lora_b] if need_adapters else []
    return dx, d_a, d_b


define_op("lora_linear_4bit_fwd", _fwd_fake)
define_op("lora_linear_4bit_bwd", _bwd_fake)


# Tensors per adapter in the flattened argument list: lora_a, lora_b, lora_b_bias.
_PER_ADAPTER = 3
# Inputs of LoraLinear4bitFunction.forward after ctx before the adapters: meta, x, bias, seeds, *quant tensors (6).
_LEADING = 4 + 6


class LoraLinear4bitFunction(torch.autograd.Function):
    """y = x·W_deqᵀ + b + Σ_a s_a·(drop_a(x)·A_aᵀ·B_aᵀ + b_Ba), W_deq the decoded 4-bit weight (frozen).

    Chain rule (dY = ∂L/∂y; the codes and scales never train)::

        dx = dY·W_deq + Σ_a m_a ⊙ (s_a·dY·B_a·A_a)/(1-p_a)     db = Σ_m dY
        dA_a = (s_a·dY·B_a)ᵀ·x̂_a     dB_a = s_a·dYᵀ·S_a     db_Ba = s_a·Σ_m dY

    Saved: x, the packed weight and scales (references), the adapters, S_a (M×r_a, fp32) and the seeds, the 1-byte
    dropout masks only where the forward op kept them (CPU); never a dequantized weight. ``meta`` = (scaling, dropout_p, blocksize, nested_blocksize, shape).
    """

    @staticmethod
    def forward(ctx, meta, x, bias, seeds, packed, absmax, nested_absmax, nested_code, offset, code, *adapters):
        scaling, dropout_p, blocksize, nested_blocksize, shape = meta
        quant = (packed, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, shape)
        lora_a = list(adapters[0::_PER_ADAPTER])
        lora_b = list(adapters[1::_PER_ADAPTER])
        lora_b_bias = list(adapters[2::_PER_ADAPTER])
        forced = _dispatch.forced_backend()
        # saved_s: [S_a], then the dropout masks where the backend keeps them (the reference on CPU).
        y, saved_s = torch.ops.peft_kernels.lora_linear_4bit_fwd(
            x, *quant, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds
        )
        ctx.meta = meta
        ctx.n_adapters = len(lora_a)
        ctx.forced_backend = forced
        ctx.has_bias = bias is not None
        ctx.lora_b_bias_present = [t is not None for t in lora_b_bias]
        # The quantized base is frozen model state, not an activation: kept as a reference on ctx (as bitsandbytes'
        # MatMul4Bit keeps its quant_state), so saved-tensor hooks (offloading, the saved-bytes measurement) see
        # only what this call adds: x, the seeds, S and the adapters.
        ctx.quant_tensors = (packed, absmax, nested_absmax, nested_code, offset, code)
        ctx.save_for_backward(x, seeds, *lora_a, *lora_b, *saved_s)
        return y

    @staticmethod
    def backward(ctx, dy):
        n = ctx.n_adapters
        scaling, dropout_p, blocksize, nested_blocksize, shape = ctx.meta
        x, seeds, *rest = ctx.saved_tensors
        packed, absmax, nested_absmax, nested_code, offset, code = ctx.quant_tensors
        quant = (packed, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, shape)
        lora_a, lora_b, saved_s = rest[:n], rest[n : 2 * n], rest[2 * n :]
        needs = ctx.needs_input_grad
        adapter_needs = needs[_LEADING:]
        need_adapters = any(adapter_needs[i] or adapter_needs[i + 1] for i in range(0, _PER_ADAPTER * n, 3))
        dx, d_a, d_b = _dispatch.run_with_backend(
            ctx.forced_backend, torch.ops.peft_kernels.lora_linear_4bit_bwd, dy, x, *quant, lora_a, lora_b, saved_s, scaling, dropout_p, seeds,
            [needs[1], need_adapters],
        )  # fmt: skip
        d_bias = dy.sum(0) if needs[2] and ctx.has_bias else None
        grads = []
        for i in range(n):
            ga = d_a[i] if adapter_needs[3 * i] else None
            gb = d_b[i] if adapter_needs[3 * i + 1] else None
            gbb = dy.sum(0) * scaling[i] if ctx.lora_b_bias_present[i] and adapter_needs[3 * i + 2] else None
            grads += [ga, gb, gbb]
        return (None, dx, d_bias, None, None, None, None, None, None, None, *grads)


def lora_linear_4bit_multi(
    x: torch.Tensor,
    quant: Quant4bit,
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

    ``quant``: the 4-bit weight as ``quant_operands`` returns it. Dropout applies only when ``training``.
    """
    n, k = quant.shape
    _check_shapes(x, _WeightShape(quant.shape), bias, lora_a, lora_b, dropout_p)
    x2d = x if x.dim() == 2 else x.reshape(-1, k)
    p_eff, seeds = _dropout_args(dropout_p, training, x.device)
    scaling = [float(s) for s in scaling]
    if _needs_autograd(x, bias, *lora_a, *lora_b, *lora_b_bias):
        adapters = []
        for a, b, bb in zip(lora_a, lora_b, lora_b_bias):
            adapters += [a, b, bb]
        meta = (scaling, p_eff, quant.blocksize, quant.nested_blocksize, list(quant.shape))
        y = _dispatch.run_with_backend(
            backend, LoraLinear4bitFunction.apply, meta, x2d, bias, seeds, *quant[:6], *adapters
        )
    else:
        # Inference: nothing to save, no autograd node; the forward op alone (as ops.lora_linear_multi).
        y, _ = _dispatch.run_with_backend(
            backend, torch.ops.peft_kernels.lora_linear_4bit_fwd,
            x2d, *quant, bias, list(lora_a), list(lora_b), list(lora_b_bias), scaling, p_eff, seeds,
        )  # fmt: skip
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


class _WeightShape(NamedTuple):
    """What ``_check_shapes`` reads of a weight (its shape), for the (N, K) a 4-bit weight decodes to."""

    shape: list[int]


def lora_linear_4bit(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_state: Any,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str | None = None,
    lora_b_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x·W_deqᵀ + b + scaling·(drop(x)·lora_aᵀ·lora_bᵀ + lora_b_bias), W_deq decoded from 4 bits.

    Args:
        x: (*, K) fp16/bf16/fp32 (fp64 on the reference).
        weight, quant_state: what ``bitsandbytes.functional.quantize_4bit`` returns for an (N, K) weight, or a
            ``Params4bit`` and its ``quant_state`` (nf4/fp4, nested or not, any blocksize, uint8 or other storage).
        bias: (N,) in x's dtype, or None.  lora_a: (r, K).  lora_b: (N, r).
        scaling: s.  dropout_p: p in [0, 1), applied to the LoRA input only, only when ``training``.
        backend: "reference", "triton", "cuda" or None (then ``PEFT_KERNELS_BACKEND``, then the best available).
    Returns: (*, N) in x's dtype. W_deq is rounded once from fp32 to x's dtype; no gradient reaches the weight.
    """
    quant = quant_operands(weight, quant_state)
    return lora_linear_4bit_multi(
        x, quant, bias, [lora_a], [lora_b], [lora_b_bias], [scaling], [dropout_p], training, backend
    )
