"""Reference LoRA linear: the specification of ``lora_linear_fwd`` / ``lora_linear_bwd``.

Semantics (n active adapters, a = 1..n)::

    x̂_a = m_a ⊙ x / (1 - p_a)          m_a = dropout mask(seed_a, M, K, p_a); x̂_a = x when p_a == 0
                                       (the Philox spec of dropout.py; on CPU a faster seeded generator)
    S_a = x̂_a · A_aᵀ                   [M, r_a], kept in acc_a = promote_types(A_a.dtype, float32)
    y   = x · Wᵀ + b + Σ_a s_a · (S_a · B_aᵀ + b_Ba)        [M, N], dtype of x

W is ``weight`` itself, or for a quantized base ``formats.dequantize(weight, weight_scale, x.dtype)`` (int8:
``(weight_int8 · weight_scale[:, None])`` in promote_types(x.dtype, float32), rounded once to x's dtype); neither
``weight`` nor ``weight_scale`` of a quantized base receives a gradient. On CPU tensors the forward also returns
each m_a (p_a > 0) after the S_a (``keeps_masks``), and the backward reads them instead of regenerating them.

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

from ...formats import dequantize
from .dropout import dropout_keep_mask

_ACC_DTYPES: dict[torch.dtype, torch.dtype] = {}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """promote_types(dtype, float32), memoized: torch.promote_types is a dispatcher call (~3 µs on CPU), and this
    runs per adapter per call."""
    acc = _ACC_DTYPES.get(dtype)
    if acc is None:
        acc = _ACC_DTYPES[dtype] = torch.promote_types(dtype, torch.float32)
    return acc


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in ``dtype``; t itself when it already is (a no-op ``.to`` still costs a dispatcher call, ~2 µs on CPU,
    and the backward has six of them per adapter)."""
    return t if t.dtype == dtype else t.to(dtype)


_ZEROS: dict[tuple, torch.Tensor] = {}


def _mm_scaled(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """s·(a·b): one addmm with alpha = s (beta = 0 ignores its 0-dim input), plain mm for s = 1. A separate mul_ by
    a Python float costs a scalar wrap and a pass, ~10 µs per call on the CI box, twice per adapter per backward."""
    if s == 1.0:
        return torch.mm(a, b)
    key = (a.dtype, a.device)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), dtype=a.dtype, device=a.device)
    return torch.addmm(zero, a, b, beta=0, alpha=s)


def _keep_mask(x: torch.Tensor, p: float, seeds, index: int) -> torch.Tensor:
    """m_a, bool (M, K), for adapter ``index`` (dropout.dropout_keep_mask)."""
    return dropout_keep_mask(seeds[index], x.shape[0], x.shape[1], p, x.device)


def _as_float(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """m as 0/1 in ``dtype``, one conversion pass. On CPU ``t * keep`` with a bool or uint8 operand first copies
    it to t's dtype behind the scenes (a scalar loop for bool, measured 15x slower than uint8); converting once
    and reusing the float mask, in place, saves those hidden copies."""
    return keep.view(torch.uint8).to(dtype)


# A quantized base weight is dequantized in blocks, each feeding its slice of the GEMM, so a large weight never has
# a full N×K float temporary (peak memory). Block size = (elements, at least this many rows or columns):
# - GEMM-sized inputs (M > 16 tokens): 2**20 elements (fp32: 4 MiB), ≥ 128. Smaller blocks cost GEMM speed:
#   256 KiB blocks made a 512×256×688 step 10% slower (measured); dequantizing is ~2% of that GEMM's time.
# - decode-sized inputs (M ≤ 16): the product is a matrix-vector one, bound by reading the block, so 2**18 elements
#   (1 MiB fp32), ≥ 16, stay in the core's L2 between the dequantization that writes them and the product that
#   reads them: M = 1, 4096 → 1024 took 3.3 ms in 64-row blocks vs 5.4 ms in 256-row ones (one thread, measured).
# The 4-bit reference caps its decode chunks at decode sizes with the same two constants.
DECODE_TOKENS_MAX = 16
DECODE_BLOCK_ELEMENTS = 2**18
_DEQUANT_BLOCKS = {"gemm": (2**20, 128), "decode": (DECODE_BLOCK_ELEMENTS, 16)}


def _block(other: int, tokens: int) -> int:
    """Rows (or columns) per dequantized block of a weight whose other extent is ``other``, for ``tokens`` rows of x."""
    elements, minimum = _DEQUANT_BLOCKS["decode" if tokens <= DECODE_TOKENS_MAX else "gemm"]
    return max(minimum, elements // max(other, 1))


def _base_linear(x, weight, weight_scale, bias):
    """x·Wᵀ + b (M, N) in x's dtype; W dequantized (formats.dequantize) a block of output rows at a time."""
    if weight_scale is None:
        return torch.nn.functional.linear(x, weight, bias)
    n_out, n_in = weight.shape
    y = x.new_empty((x.shape[0], n_out))
    step = _block(n_in, x.shape[0])
    for n0 in range(0, n_out, step):
        w_block = dequantize(weight[n0 : n0 + step], weight_scale[n0 : n0 + step], x.dtype)  # [n, K]
        y_block = y[:, n0 : n0 + step]  # a strided slice: the GEMM writes it in place (ldc = N)
        if bias is None:
            torch.mm(x, w_block.t(), out=y_block)
        else:
            torch.addmm(bias[n0 : n0 + step], x, w_block.t(), out=y_block)
    return y


def _base_input_grad(dy, weight, weight_scale, dtype):
    """dY·W (M, K) in ``dtype``; W dequantized in ``dtype`` a block of input columns at a time."""
    if weight_scale is None:
        return _as(torch.mm(dy, _as(weight, dy.dtype)), dtype)
    n_out, n_in = weight.shape
    dx = dy.new_empty((dy.shape[0], n_in))
    step = _block(n_out, dy.shape[0])
    for k0 in range(0, n_in, step):
        w_block = _as(dequantize(weight[:, k0 : k0 + step], weight_scale, dtype), dy.dtype)  # [N, k]
        torch.mm(dy, w_block, out=dx[:, k0 : k0 + step])
    return _as(dx, dtype)


def not_supported_reasons(op_name: str, *args) -> list[str]:
    """The reference runs every call of its ops."""
    return []


def keeps_masks(x: torch.Tensor) -> bool:
    """Whether the forward returns its dropout masks for the backward (1 byte per element of x): on CPU tensors,
    where regenerating a mask costs two more elementwise passes over M×K, more than the whole low-rank update
    (measured: 3 ms uniform + 11 ms compare per 512×768 mask on the 2-core CI box). On a GPU the reference
    regenerates them, as the fused kernels do. The ops' fake kernels read this too (output structure)."""
    return x.is_cpu


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
    weight_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y = x·Wᵀ + b + Σ_a s_a·(x̂_a·A_aᵀ·B_aᵀ + b_Ba); returns (y, [S_a] + kept masks).

    Args:
        x: (M, K), any strides.
        weight: (N, K), any strides (a GPT-2 Conv1D weight arrives as its transposed view).
        bias: (N,) or None.
        lora_a: n tensors (r_a, K).  lora_b: n tensors (N, r_a).  lora_b_bias: n tensors (N,) or None.
        scaling, dropout_p: n floats.  seeds: int64 (n,) or None when every p is 0.
        weight_scale: None for a float weight; else W = formats.dequantize(weight, weight_scale, x.dtype) (int8).
        Kept masks: m_a (bool (M, K)) of every adapter with p_a > 0, after the S_a, on CPU (``keeps_masks``).
    Accumulates in promote_types(dtype, float32); y has x's dtype, S_a has acc_a.
    """
    y = _base_linear(x, weight, weight_scale, bias)
    return add_lora_fwd(y, x, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds, keeps_masks(x))


def lora_linear_inference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    lora_b_bias: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + s·(x·Aᵀ·Bᵀ + b_B): ``lora_linear_fwd``'s y for one adapter without dropout, x of any rank.

    Args:
        x: (*, K).  weight: (N, K) (int8 with ``weight_scale`` (N,) fp32).  bias, lora_b_bias: (N,) or None.
        lora_a: (r, K).  lora_b: (N, r).  scaling: s.
    Returns: (*, N) in x's dtype: ``lora_linear_fwd``'s y on x flattened to (M, K) (the N-D path adds the update
    unfused, so the last bits may differ).
    """
    n_in = x.shape[-1]
    if (
        x.dim() > 2
        and weight_scale is None
        and x.numel() <= DECODE_TOKENS_MAX * n_in
        and x.dtype == weight.dtype == lora_a.dtype == lora_b.dtype == _acc_dtype(x.dtype)
    ):
        # A decode-sized N-D input as it is: three F.linear and one add. On CPU the two reshapes the 2-D form needs
        # cost about what a small GEMM call does, more than the few-KB (M, N) temporary of the unfused add; from
        # M = 64 on flattening is faster (measured, docs/KERNELS.md §8). fp32 / fp64 throughout: S needs no wider
        # accumulator, so the unfused chain is the same formula.
        update = torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a), lora_b, lora_b_bias)
        return torch.nn.functional.linear(x, weight, bias).add_(update, alpha=scaling)
    args = (x, weight, bias, lora_a, lora_b, scaling, lora_b_bias, weight_scale)
    return inference_output(args, lora_linear_fwd(*inference_as_forward(*args)))


def inference_as_forward(x, weight, bias, lora_a, lora_b, scaling, lora_b_bias=None, weight_scale=None) -> tuple:
    """The ``lora_linear_fwd`` call a ``lora_linear_inference`` call is: x flattened to (M, K), one adapter, p = 0.
    Backends without their own inference kernel run it this way (ops/_dispatch.py ``DERIVED``)."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2d, weight, bias, [lora_a], [lora_b], [lora_b_bias], [scaling], [0.0], None, weight_scale


def inference_output(args: tuple, forward_result) -> torch.Tensor:
    """``lora_linear_fwd``'s (y (M, N), saved) → y (*, N), the leading shape of the inference call's x (args[0])."""
    x, y = args[0], forward_result[0]
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def add_lora_fwd(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    lora_b_bias: list[torch.Tensor | None],
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor | None,
    keep_masks: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(y + Σ_a s_a·(x̂_a·A_aᵀ·B_aᵀ + b_Ba), [S_a] + kept masks) for a base output y (M, N): the LoRA half of
    the forward, shared with the 4-bit reference (updates y in place when the dtypes allow)."""
    saved_s, masks = [], []
    for index, (a, b, b_bias, s, p) in enumerate(zip(lora_a, lora_b, lora_b_bias, scaling, dropout_p)):
        acc = _acc_dtype(a.dtype)
        x_cast = x if x.dtype == a.dtype else x.to(a.dtype)
        if p == 0.0:
            shrink = torch.nn.functional.linear(x_cast, a)  # [M, r] = x·Aᵀ (one call; mm(x, a.t()) is two)
        else:
            # (m ⊙ x)·Aᵀ / (1-p): the 1/(1-p) goes on the small [M, r] product, not on x.
            keep = _keep_mask(x, p, seeds, index)
            if keep_masks:
                masks.append(keep)
            shrink = _mm_scaled(_as_float(keep, x_cast.dtype).mul_(x_cast), a.t(), 1.0 / (1.0 - p))
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
    return y, saved_s + masks


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
    weight_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
    """(dx, [dA_a], [dB_a]) of lora_linear_fwd; see the module docstring.

    Args:
        dy: (M, N).  x, weight, lora_a, lora_b, scaling, dropout_p, seeds: as in the forward.
        saved_s: the forward's second output: [S_a], (M, r_a) in acc_a, then the kept masks if it kept them.
        output_mask: [need dx, need the adapter gradients]; what is not needed is not computed
            (dx None, lists empty).
        weight_scale: as in the forward; W is only dequantized when dx is needed (its only consumer).
    dx has x's dtype; dA_a, dB_a the dtypes of A_a, B_a.
    """
    need_dx, need_adapters = output_mask
    # dY·W last, accumulated onto the LoRA terms by one in-place addmm, when every operand already has x's dtype
    # (saves the separate M×K add pass and one M×K allocation); otherwise dY·W first, LoRA terms added onto it.
    fold = (
        need_dx
        and weight_scale is None
        and dy.dtype == weight.dtype == x.dtype
        and all(_acc_dtype(a.dtype) == x.dtype for a in lora_a)
    )
    dx = _base_input_grad(dy, weight, weight_scale, x.dtype) if need_dx and not fold else None
    base_weight = weight if fold else None
    return add_lora_bwd(dx, dy, x, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, need_adapters, base_weight)


def _add_lora_dx(dx, d_shrink, a, keep):
    """dx + (dS·A) [⊙ m], (M, K): the product itself when dx is None, in place when dx has dS's dtype (dS·A
    accumulated inside the GEMM when there is no mask), else added in dS's dtype and rounded back to dx's."""
    if dx is not None and dx.dtype == d_shrink.dtype:
        return dx.addmm_(d_shrink, a) if keep is None else dx.addcmul_(torch.mm(d_shrink, a), keep)
    term = torch.mm(d_shrink, a)
    if keep is not None:
        term.mul_(keep)
    return term if dx is None else torch.add(dx.to(term.dtype), term).to(dx.dtype)


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
    base_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
    """(dx + Σ_a m_a ⊙ (dS_a·A_a)/(1-p_a), [dA_a], [dB_a]) for the base part dx = dY·W (M, K), or None when dx is
    not needed: the LoRA half of the backward, shared with the 4-bit reference. ``saved_s`` as the forward's.

    ``base_weight``: W (N, K) with ``dx`` None, every dtype x's: dY·W is computed here, last, by one in-place
    addmm onto the summed LoRA terms. 1/(1-p_a) is folded into dS_a (M×r) so no M×K tensor is scaled."""
    need_dx = dx is not None or base_weight is not None
    n = len(lora_a)
    kept = iter(saved_s[n:]) if len(saved_s) > n else None
    saved_s = saved_s[:n]
    lora_dx = None  # Σ_a of the LoRA terms when dY·W comes last (base_weight)
    d_lora_a, d_lora_b = [], []
    for index, (a, b, shrink, s, p) in enumerate(zip(lora_a, lora_b, saved_s, scaling, dropout_p)):
        acc = _acc_dtype(a.dtype)
        dy_acc = _as(dy, acc)
        if need_adapters:
            d_lora_b.append(_as(_mm_scaled(dy_acc.t(), shrink, s), b.dtype))  # [N, r]
        # dS_a / (1 - p_a): [M, r]
        d_shrink = _mm_scaled(dy_acc, _as(b, acc), s if p == 0.0 else s / (1.0 - p))
        # Dropout: the kept or the regenerated mask (the same bits). One float copy of m [M, K] serves both:
        # first the dx term m ⊙ (dS_a·A_a) / (1-p_a), then m ⊙= x in place → x̂_a (1/(1-p_a) is in d_shrink).
        keep_acc = None
        if p != 0.0:
            keep = next(kept) if kept is not None else _keep_mask(x, p, seeds, index)
            keep_acc = _as_float(keep, acc)
        if base_weight is not None:
            lora_dx = _add_lora_dx(lora_dx, d_shrink, _as(a, acc), keep_acc)
        elif need_dx:
            dx = _add_lora_dx(dx, d_shrink, _as(a, acc), keep_acc)
        if need_adapters:
            x_hat = _as(x, acc) if keep_acc is None else keep_acc.mul_(x)  # m ⊙ x in acc (x promotes exactly)
            d_lora_a.append(_as(torch.mm(d_shrink.t(), x_hat), a.dtype))  # [r, K]
    if base_weight is not None:
        dx = torch.mm(dy, base_weight) if lora_dx is None else lora_dx.addmm_(dy, base_weight)
    return dx, d_lora_a, d_lora_b
