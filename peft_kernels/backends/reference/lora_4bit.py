"""Reference LoRA linear on a bitsandbytes 4-bit (NF4 / FP4) base: the specification of ``lora_linear_4bit_{fwd,bwd}``.

Weight format (bitsandbytes ``quantize_4bit``; W is (N, K), n = N·K elements, flattened row-major)::

    packed          uint8 [ceil(n/2)] (any shape / storage dtype viewed as bytes)  element i is the HIGH nibble
                    of byte i//2 when i is even, the LOW nibble when i is odd
    code            float32 [16]      the table (NF4 or FP4) a nibble indexes
    absmax          float32 [ceil(n/blocksize)]  one scale per block of ``blocksize`` consecutive elements;
                    blocks run over the flattened weight, so a block may cross a row boundary
      nested (double quantization): absmax is uint8 and the real scale is
      absmax_fp32[j] = nested_code[absmax[j]] · nested_absmax[j // nested_blocksize] + offset   (fp32, in that order)
    W[i] = code[nibble(i)] · absmax_fp32[i // blocksize]      one fp32 multiply, then ONE rounding to x's dtype

These are bnb's own operations in bnb's own order (``functional.dequantize_4bit``: nested scales by
``dequantize_blockwise`` then ``+ offset``; the 4-bit values in fp32 times the block scale), so the fp32 values are
bit for bit bnb's and so is their rounding (tests/kernels/test_ops_lora_4bit.py checks it against bnb).

Semantics: y = x·W_deqᵀ + b, then the LoRA terms exactly as ``lora.py``; backward dx = dY·W_deq + LoRA terms.
Neither the codes nor the scales receive a gradient.

Memory: the weight is decoded in chunks of output rows (``chunk_rows``), each used once and dropped, so no N×K
dequantized tensor exists: the forward writes y[:, rows] per chunk, the backward accumulates dY[:, rows]·W[rows]
into dx. A chunk costs ≈ 10 bytes per element while it lives (int32 byte indices 2, fp32 values 4, the x-dtype copy
2-4, the fp32 copy for a 16-bit backward 4); with ``N // 64`` rows per chunk that is ≤ 1/8 of the dequantized
weight's bytes. Chunks hold at least 65536 elements (``chunk_rows``), so the 1/8 bound holds from N·K ≥ 4M
elements (a 2048×2048 projection) and smaller weights cost at most ~640 KB extra (measured in the tests).
"""

from __future__ import annotations

import torch

from .lora import _acc_dtype, add_lora_bwd, add_lora_fwd

# Rows decoded at once: N // CHUNK_DIVISOR, but at least MIN_CHUNK_ELEMENTS elements (each chunk costs a few torch
# calls, ~50 µs on CPU, so tiny chunks of small weights would cost more than the decode itself).
CHUNK_DIVISOR = 64
MIN_CHUNK_ELEMENTS = 1 << 16


def chunk_rows(n_rows: int, k: int) -> int:
    return min(n_rows, max(1, n_rows // CHUNK_DIVISOR, MIN_CHUNK_ELEMENTS // max(k, 1)))


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256, 2) fp32: row b = (code[b >> 4], code[b & 15]), the two elements byte b encodes, in order."""
    byte = torch.arange(256, device=code.device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).to(torch.float32)


def block_scales(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    nested_blocksize: int,
    start: int,
    end: int,
) -> torch.Tensor:
    """absmax_fp32[start:end] (fp32): the stored scales, or bnb's nested decode of them (module docstring)."""
    if nested_absmax is None:
        return absmax[start:end].to(torch.float32)
    q = absmax[start:end].view(torch.uint8).long()
    groups = torch.arange(start, end, device=absmax.device) // nested_blocksize
    return (nested_code[q] * nested_absmax[groups]).add_(offset)


def decode_4bit_rows(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    code: torch.Tensor,
    blocksize: int,
    nested_blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
    row_start: int = 0,
    row_end: int | None = None,
) -> torch.Tensor:
    """W[row_start:row_end] (rows, K) in ``dtype``, decoded as the module docstring states (bit for bit bnb).

    Decodes whole blocks [e0 // blocksize, ceil(e1 / blocksize)) of the flattened element range [e0, e1) =
    [row_start·K, row_end·K) (a blocksize is even, so blocks start on a byte) and slices the rows out.
    """
    n_rows, k = shape
    row_end = n_rows if row_end is None else row_end
    n = n_rows * k
    e0, e1 = row_start * k, row_end * k
    b0, b1 = e0 // blocksize, -(-e1 // blocksize)
    first, last = b0 * blocksize, min(b1 * blocksize, n)  # decoded element range
    data = packed.reshape(-1).view(torch.uint8)[first // 2 : -(-last // 2)]
    values = _pair_table(code)[data.int()].reshape(-1)[: last - first]  # fp32, 4 bytes per element
    scales = block_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize, b0, b1)
    full = (last - first) // blocksize * blocksize
    values[:full].view(-1, blocksize).mul_(scales[: full // blocksize, None])
    if full < last - first:  # the weight's last, partial block
        values[full:].mul_(scales[-1])
    return values[e0 - first : e1 - first].view(row_end - row_start, k).to(dtype)


def dequantize_4bit(*quant, dtype: torch.dtype) -> torch.Tensor:
    """The whole (N, K) weight in ``dtype`` (merge and tests; the ops never build it). ``quant`` as the op's."""
    return decode_4bit_rows(*quant, dtype)


def _base_forward(x, quant, bias) -> torch.Tensor:
    """y = x·W_deqᵀ + b, (M, N) in x's dtype, one row chunk of W alive at a time."""
    n_rows = quant[-1][0]
    y = x.new_empty((x.shape[0], n_rows))
    step = chunk_rows(n_rows, quant[-1][1])
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        w = decode_4bit_rows(*quant, x.dtype, r0, r1)
        b = bias[r0:r1] if bias is not None else None
        y[:, r0:r1] = torch.nn.functional.linear(x, w, b)
    return y


def _base_backward(dy, x, quant) -> torch.Tensor:
    """dx = dY·W_deq, (M, K) in x's dtype; chunks accumulate in promote_types(x.dtype, fp32), rounded once."""
    n_rows = quant[-1][0]
    acc = _acc_dtype(x.dtype)
    dx = torch.zeros((dy.shape[0], x.shape[1]), dtype=acc, device=dy.device)
    step = chunk_rows(n_rows, quant[-1][1])
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        # Rounded to x's dtype first (the forward's W_deq), then widened for the fp32 accumulation.
        w = decode_4bit_rows(*quant, x.dtype, r0, r1).to(acc)
        dx.addmm_(dy[:, r0:r1].to(acc), w)
    return dx.to(x.dtype)


def not_supported_reasons(op_name: str, *args) -> list[str]:
    """The reference runs every call of its ops (the spec): never a reason."""
    return []


def _quant(packed, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, shape):
    return (packed, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, list(shape))


def lora_linear_4bit_fwd(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    code: torch.Tensor,
    blocksize: int,
    nested_blocksize: int,
    shape: list[int],
    bias: torch.Tensor | None,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    lora_b_bias: list[torch.Tensor | None],
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor | None,
    keep_masks: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y = x·W_deqᵀ + b + Σ_a s_a·(x̂_a·A_aᵀ·B_aᵀ + b_Ba); returns (y, [S_a] + kept masks).

    Args:
        x: (M, K) fp16/bf16/fp32/fp64.  packed … shape: the 4-bit weight (module docstring), shape = [N, K].
        bias: (N,) in x's dtype, or None.  lora_a … seeds, keep_masks: as ``lora.lora_linear_fwd``.
    The base product is computed chunk by chunk, then ``lora.add_lora_fwd`` adds the LoRA terms.
    """
    quant = _quant(packed, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, shape)
    y = _base_forward(x, quant, bias)
    return add_lora_fwd(y, x, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds, keep_masks)


def lora_linear_4bit_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    code: torch.Tensor,
    blocksize: int,
    nested_blocksize: int,
    shape: list[int],
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    saved_s: list[torch.Tensor],
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
    """(dx, [dA_a], [dB_a]) of lora_linear_4bit_fwd.

    dx = dY·W_deq (chunked) + Σ_a m_a ⊙ (dS_a·A_a)/(1-p_a); dA, dB as ``lora.lora_linear_bwd``.
    output_mask: [need dx, need the adapter gradients].
    """
    quant = _quant(packed, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, shape)
    need_dx, need_adapters = output_mask
    dx = _base_backward(dy, x, quant) if need_dx else None
    return add_lora_bwd(dx, dy, x, lora_a, lora_b, saved_s, scaling, dropout_p, seeds, need_adapters)
