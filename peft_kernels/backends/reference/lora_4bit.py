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

Memory: the weight is decoded in row chunks, each used once and overwritten by the next (one buffer per call), so
no N×K dequantized tensor exists. The forward decodes W[rows] and writes y[:, rows] in place (no M×rows
temporary); the backward accumulates dx += dY[:, rows]·W[rows]. A chunk's live bytes (``chunk_budget``: decoded
values, decode temporaries, the backward's widened copy) plus the fp32 block scales, decoded once per call, stay
≤ 1/8 of the dequantized weight's bytes; chunks hold at least ``MIN_CHUNK_BYTES`` (768 KiB), the budget of a
4M-element bf16 weight with blocksize 64, so that bound holds from N·K ≥ 4M elements (a 2048×2048 projection)
and a smaller weight's chunk may exceed it, by at most 768 KiB.

Decoders (``cpu_decoder`` names the one a call uses): this file's torch decode is the spec and the fallback.
When bitsandbytes has registered its native CPU kernel ``torch.ops.bitsandbytes.dequantize_4bit`` (it has, once
bitsandbytes is imported, which making a 4-bit weight needs) and the code table is bnb's NF4 or FP4, K is even
and x is fp16/bf16/fp32, each chunk is decoded by bnb's C kernel instead, called directly into the call's chunk
buffer (its op where this bitsandbytes lacks the C symbol): ~10x faster than the torch decode, and bit for bit
the same (tests/kernels/test_ops_lora_4bit.py). bnb's blocks run over the flattened weight, so those chunks start
on a block boundary (a multiple of blocksize / gcd(K, blocksize) rows).

Which bnb CPU path PEFT's side takes (``bnb.matmul_4bit``, bitsandbytes 0.50.2): on the standard layout, with or
without grad, the whole N×K weight is decoded by the same C kernel (through its op, a fresh N×K tensor per call)
and multiplied by one GEMM, in the backward again. Only after bnb's AVX512-BF16 repack (first no-grad eval
forward on such CPUs, ``quant_state.packing_format_for_cpu``) does it run its fused bf16 kernel instead; this
path reads that layout through ``layers.lora_4bit.unpack_cpu_layout`` (decoded as the standard one).
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Callable, Iterator

import torch

from .lora import DECODE_BLOCK_ELEMENTS, DECODE_TOKENS_MAX, _acc_dtype, add_lora_bwd, add_lora_fwd, keeps_masks

# Live bytes of a chunk at least (module docstring: the largest floor that keeps the 1/8 bound from N·K = 4M on).
# Small chunks cost GEMM speed: the backward's dx += dY[:, rows]·W[rows] passes over dx once per chunk; at
# 768×768, M = 256 (fp32, one CPU thread) 160-row chunks ran at 0.92x of one GEMM, 256-row ones at 0.97x (measured).
MIN_CHUNK_BYTES = 768 << 10
# Decode-sized calls (M ≤ DECODE_TOKENS_MAX) are matrix-vector products bound by reading each chunk: chunks of at
# most DECODE_BLOCK_ELEMENTS (the int8 reference's decode block, 1 MiB in fp32) stay in the core's L2 between the
# decode that writes them and the product that reads them.
# Chunks of a multiple of this many rows where they hold that many: MKL's sgemm on a 256×768 x
# against a 77-row chunk ran 13% slower than against an 80-row one (one CPU thread, measured).
GEMM_ROW_MULTIPLE = 16
# Live bytes per element of a chunk beyond the decoded values (dtype bytes): the torch decode's int32 byte indices
# (2) and fp32 values (4), bnb's native kernel nothing.
_DECODE_OVERHEAD = {"torch": 6, "bitsandbytes": 0}
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def chunk_budget(n_rows: int, k: int, weight_itemsize: int, blocksize: int) -> int:
    """Bytes a chunk may hold: 1/8 of the dequantized weight's, less the fp32 block scales decoded once per call."""
    return n_rows * k * weight_itemsize // 8 - 4 * -(-n_rows * k // blocksize)


def chunk_rows(n_rows: int, k: int, bytes_per_element: int, budget: int, row_multiple: int = 1) -> int:
    """Rows per chunk: rows·K·bytes_per_element ≤ max(budget, MIN_CHUNK_BYTES), a multiple of ``row_multiple``
    (chunks that start on a bnb block)."""
    rows = max(max(budget, MIN_CHUNK_BYTES) // (max(k, 1) * bytes_per_element), 1)
    return _rounded_rows(n_rows, rows, row_multiple)


def _rounded_rows(n_rows: int, rows: int, row_multiple: int) -> int:
    """``rows`` rounded down to a multiple of ``row_multiple`` (and of GEMM_ROW_MULTIPLE when that large), in
    [row_multiple, n_rows]."""
    if rows >= GEMM_ROW_MULTIPLE:  # GEMM-friendly chunks: 77-row chunks ran 0.81x of one GEMM, 80-row 0.93x
        row_multiple = math.lcm(row_multiple, GEMM_ROW_MULTIPLE)
    return min(n_rows, max(row_multiple, rows // row_multiple * row_multiple))


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
    start: int = 0,
    end: int | None = None,
) -> torch.Tensor:
    """absmax_fp32[start:end] (fp32): the stored scales, or bnb's nested decode of them (module docstring).

    Nested: decoded from the nested block holding ``start`` on, in place (8 bytes per scale while it runs)."""
    end = absmax.numel() if end is None else end
    if nested_absmax is None:
        return absmax.reshape(-1)[start:end].to(torch.float32)
    g0 = start // nested_blocksize * nested_blocksize
    scales = nested_code[absmax.reshape(-1)[g0:end].view(torch.uint8).int()]  # fp32
    full = (end - g0) // nested_blocksize * nested_blocksize
    groups = nested_absmax[g0 // nested_blocksize :]
    scales[:full].view(-1, nested_blocksize).mul_(groups[: full // nested_blocksize, None])
    if full < end - g0:  # the last, partial nested block
        scales[full:].mul_(groups[full // nested_blocksize])
    return scales.add_(offset)[start - g0 :]


def _decode_span(data, scales, table, blocksize, first, last, dtype) -> torch.Tensor:
    """Elements [first, last) (first on a block boundary) in ``dtype``: data = their bytes, scales = their blocks'."""
    values = table[data.int()].reshape(-1)[: last - first]  # fp32, 4 bytes per element
    full = (last - first) // blocksize * blocksize
    values[:full].view(-1, blocksize).mul_(scales[: full // blocksize, None])
    if full < last - first:  # the weight's last, partial block
        values[full:].mul_(scales[full // blocksize])
    return values.to(dtype)


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
    """W[row_start:row_end] (rows, K) in ``dtype``, decoded as the module docstring states (bit for bit bnb)."""
    n_rows, k = shape
    row_end = n_rows if row_end is None else row_end
    b0, b1 = _block_range(row_start, row_end, k, blocksize)
    scales = block_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize, b0, b1)
    return _decode_rows(
        _flat_bytes(packed), scales, _pair_table(code), blocksize, k, n_rows, row_start, row_end, dtype, block0=b0
    )


def _block_range(r0: int, r1: int, k: int, blocksize: int) -> tuple[int, int]:
    """[b0, b1): the blocks holding rows r0..r1 of the flattened (N, K) weight (elements [r0·K, r1·K))."""
    return r0 * k // blocksize, -(-r1 * k // blocksize)


def _decode_rows(data, scales, table, blocksize, k, n_rows, r0, r1, dtype, block0: int = 0) -> torch.Tensor:
    """W[r0:r1] (rows, K) in ``dtype`` by the torch decode: the whole blocks holding those rows (a blocksize is even,
    so blocks start on a byte) decoded from the weight's bytes ``data`` and fp32 block ``scales`` (from block
    ``block0`` on), then the rows sliced out."""
    e0, e1 = r0 * k, r1 * k
    b0, b1 = _block_range(r0, r1, k, blocksize)
    first, last = b0 * blocksize, min(b1 * blocksize, n_rows * k)  # decoded element range
    span = data[first // 2 : -(-last // 2)]
    values = _decode_span(span, scales[b0 - block0 : b1 - block0], table, blocksize, first, last, dtype)
    return values[e0 - first : e1 - first].view(r1 - r0, k)


def dequantize_4bit(*quant, dtype: torch.dtype) -> torch.Tensor:
    """The whole (N, K) weight in ``dtype`` (merge and tests; the ops never build it). ``quant`` as the op's."""
    return decode_4bit_rows(*quant, dtype)


def _native_quant_type(code: torch.Tensor, k: int, dtype: torch.dtype) -> str | None:
    """ "nf4" / "fp4" where bitsandbytes' native CPU kernel can decode this weight, else None."""
    if code.device.type != "cpu" or dtype not in _NATIVE_DTYPES or k % 2:
        return None
    if not _native_kernel_registered():
        return None  # bitsandbytes not imported, or its native library did not load (then no CPU kernel)
    global _last_table
    if _last_table[0] is code and _last_table[1] == code._version:  # a layer passes the same table every call
        return _last_table[2]
    found = next((quant_type for quant_type, table in _bnb_tables().items() if torch.equal(code, table)), None)
    _last_table = (code, code._version, found)  # None: a custom table, which only the torch decode reads
    return found


_last_table: tuple = (None, -1, None)


def _native_kernel_registered() -> bool:
    """bitsandbytes registered a CPU kernel of its dequantize_4bit op (it does on import when its native library
    loads)."""
    global _native_registered
    if not _native_registered:  # once registered, it stays: the lookup (~60 µs) is paid until then only
        try:
            _native_registered = torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::dequantize_4bit", "CPU")
        except RuntimeError:  # the op does not exist: bitsandbytes not imported
            return False
    return _native_registered


_native_registered = False


@functools.cache
def _bnb_tables() -> dict[str, torch.Tensor]:
    """bnb's NF4 and FP4 code tables, read once (building them costs ~40 µs a call)."""
    import bitsandbytes.functional as bnb_functional  # already imported: it registered the native kernel

    return {name: bnb_functional.get_4bit_type(name, device="cpu") for name in ("nf4", "fp4")}


@functools.cache
def _bnb_c_function(name: str) -> Callable | None:
    """The C function ``name`` of bitsandbytes' loaded native library (ctypes), or None where it has none.

    Why call it directly: its registered op costs ~70 µs a call on top (torch.library dispatch to a Python kernel
    that allocates the output), 4-5x the C kernel's own time on a 128k-element chunk; the direct call also writes
    into the caller's buffer, which stays in cache from one chunk to the next."""
    try:
        import bitsandbytes
        from bitsandbytes.cextension import lib
    except Exception:  # any import failure: the registered ops serve (or the torch decode)
        return None
    # A C function called through ctypes has no signature check: a release that changed its arguments would write
    # out of bounds. Only the releases whose signatures the decode tests verified take this route; others the op.
    if not bitsandbytes.__version__.startswith(_C_VERIFIED_RELEASES):
        return None
    return getattr(getattr(lib, "_lib", None), name, None)


# bitsandbytes releases whose CPU dequantize C functions have the argument lists used here (checked bit for bit
# against the torch decode by tests/kernels/test_ops_lora_4bit.py).
_C_VERIFIED_RELEASES = ("0.50.",)


_C_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# bnb routes blocksizes from this on away from its C kernel on AVX512 CPUs (accuracy); so do we, through its op.
_C_MAX_BLOCKSIZE = 2048


def _native_decoder(data, scales, quant_type: str, dtype: torch.dtype, blocksize: int, k: int):
    """decode(r0, out): out (rows, K) ← bnb's dequantize_4bit of rows r0… (r0·K on a block boundary) from the
    codes ``data`` (uint8, contiguous) and fp32 block ``scales`` (contiguous): bnb's C kernel called directly where
    this bitsandbytes has it (pointer arithmetic, no tensor slicing: ~20 µs a chunk less), else its op."""
    name = f"cdequantize_blockwise_cpu_{quant_type}_{_C_DTYPES[dtype]}"
    function = _bnb_c_function(name) if blocksize < _C_MAX_BLOCKSIZE else None
    if function is None:
        op = torch.ops.bitsandbytes.dequantize_4bit

        def decode(r0: int, out: torch.Tensor) -> None:
            e0, e1 = r0 * k, (r0 + out.shape[0]) * k
            blocks = scales[e0 // blocksize : -(-e1 // blocksize)]
            out.copy_(op(data[e0 // 2 : e1 // 2], blocks, blocksize, quant_type, list(out.shape), dtype))

        return decode
    codes_at, scales_at = data.data_ptr(), scales.data_ptr()
    c_blocksize, c_k = ctypes.c_longlong(blocksize), ctypes.c_longlong(k)

    def decode(r0: int, out: torch.Tensor) -> None:
        # Raw pointers into contiguous tensors: the codes and scales of element r0·K on, the caller's buffer.
        e0 = r0 * k
        codes, blocks = ctypes.c_void_p(codes_at + e0 // 2), ctypes.c_void_p(scales_at + 4 * (e0 // blocksize))
        function(codes, blocks, ctypes.c_void_p(out.data_ptr()), c_blocksize, ctypes.c_longlong(out.shape[0]), c_k)

    return decode


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def cpu_decoder() -> str:
    """Which decoder the CPU path uses now, in words (``peft-kernels info``)."""
    if _native_kernel_registered():
        how = "its C kernel called directly" if _bnb_c_function("cdequantize_blockwise_cpu_nf4_fp32") else "its op"
        return (
            f"bitsandbytes' native dequantize_4bit ({how}) into one reused row-chunk buffer per call (bnb's NF4 or "
            "FP4 table, even K, fp16/bf16/fp32 x; the torch decode otherwise)"
        )
    return "torch decode (the spec): bitsandbytes is not importable or has no native CPU kernel"


def _call_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize, native: bool) -> torch.Tensor:
    """All block scales in fp32 (contiguous), once per call: ``block_scales``, or with ``native`` bnb's own nested
    decode (its CPU dequantize_blockwise kernel, then + offset: the same fp32 operations, not ~8 torch ops)."""
    if not native or nested_absmax is None:
        return block_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize).contiguous()
    codes = _flat_bytes(absmax)
    function = _bnb_c_function("cdequantize_blockwise_cpu_fp32")
    if function is None or not (nested_absmax.dtype == nested_code.dtype == torch.float32):
        dequantize = torch.ops.bitsandbytes.dequantize_blockwise
        return dequantize(codes, nested_absmax, nested_code, nested_blocksize, torch.float32).add_(offset)
    codes, nested_absmax, nested_code = codes.contiguous(), nested_absmax.contiguous(), nested_code.contiguous()
    scales = torch.empty(codes.numel(), dtype=torch.float32)
    function(_ptr(nested_code), _ptr(codes), _ptr(nested_absmax), _ptr(scales), ctypes.c_longlong(nested_blocksize),
             ctypes.c_longlong(codes.numel()))  # fmt: skip
    return scales.add_(offset)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """t's bytes as a contiguous 1-D uint8 tensor (t itself when it is one: a reinterpreting view costs ~10 µs)."""
    if t.dtype == torch.uint8:
        return t if t.dim() == 1 else t.reshape(-1)  # bnb's packed weight is (N·K/2, 1)
    return t.reshape(-1).view(torch.uint8)


def _row_chunks(
    quant, dtype: torch.dtype, extra_bytes: int = 0, max_elements: int | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(r0, r1, W[r0:r1] in dtype) over the weight, in chunks sized by ``chunk_rows``; ``extra_bytes`` per element:
    what the caller adds per chunk element (the backward's fp32 copy). Block scales are decoded once per call.

    bnb's native kernel decodes every chunk into ONE buffer allocated per call: a chunk is valid until the next is
    yielded (the caller uses it and lets go), and the buffer stays in cache between the decode and the GEMM."""
    packed, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, shape = quant
    n_rows, k = shape
    data = _flat_bytes(packed)
    quant_type = _native_quant_type(code, k, dtype)
    scales = _call_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize, quant_type is not None)
    decoder = "torch" if quant_type is None else "bitsandbytes"
    row_multiple = 1 if quant_type is None else blocksize // math.gcd(k, blocksize)
    per_element = dtype.itemsize + _DECODE_OVERHEAD[decoder] + extra_bytes
    step = chunk_rows(n_rows, k, per_element, chunk_budget(n_rows, k, dtype.itemsize, blocksize), row_multiple)
    if max_elements is not None and step * k > max_elements:
        step = _rounded_rows(n_rows, max(max_elements // k, 1), row_multiple)
    if quant_type is not None:
        data = data.contiguous()  # (it is, as bnb stores it) held here while the decoder reads it by address
        decode = _native_decoder(data, scales, quant_type, dtype, blocksize, k)
        buffer = torch.empty((step, k), dtype=dtype, device=data.device)
        for r0 in range(0, n_rows, step):
            r1 = min(r0 + step, n_rows)
            w = buffer if r1 - r0 == step else buffer[: r1 - r0]
            decode(r0, w)  # r0·K on a block boundary: bnb's blocks line up
            yield r0, r1, w
        return
    table = _pair_table(code)
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        # Not held here: the caller drops each chunk before the next is decoded (a held one would double the peak).
        yield r0, r1, _decode_rows(data, scales, table, blocksize, k, n_rows, r0, r1, dtype)


def _base_forward(x, quant, bias) -> torch.Tensor:
    """y = x·W_deqᵀ + b, (M, N) in x's dtype, one row chunk of W alive at a time, written into y's columns."""
    n_rows = quant[-1][0]
    y = x.new_empty((x.shape[0], n_rows))
    if bias is not None:
        y.copy_(bias)
    decode_sized = x.shape[0] <= DECODE_TOKENS_MAX
    for r0, r1, w in _row_chunks(quant, x.dtype, max_elements=DECODE_BLOCK_ELEMENTS if decode_sized else None):
        out = y[:, r0:r1]  # (M, rows) with row stride N: BLAS writes it in place
        if bias is not None:
            out.addmm_(x, w.t())
        else:
            torch.mm(x, w.t(), out=out)
    return y


def _base_backward(dy, x, quant) -> torch.Tensor:
    """dx = dY·W_deq = Σ_chunks dY[:, rows]·W[rows], (M, K) in x's dtype, accumulated in promote_types(x.dtype,
    fp32) and rounded once; W_deq is rounded to x's dtype first (the forward's), then widened.

    Row chunks, each a GEMM with inner dimension rows accumulated into dx: at 768×768, M = 256 on one CPU thread
    256-row chunks ran at 0.97x of one GEMM, where column chunks dx[:, cols] = dY·W[:, cols] (strided output, a
    gather of each chunk's codes) ran at 0.87x (measured)."""
    acc = _acc_dtype(x.dtype)
    extra = acc.itemsize if acc != x.dtype else 0
    dy_acc = dy.to(acc)
    dx = None
    for r0, r1, w in _row_chunks(quant, x.dtype, extra):
        if dx is None:  # the first chunk writes dx: no zero fill
            dx = torch.mm(dy_acc[:, r0:r1], w.to(acc))
        else:
            dx.addmm_(dy_acc[:, r0:r1], w.to(acc))
    if dx is None:  # N = 0: no chunk
        dx = torch.zeros((dy.shape[0], x.shape[1]), dtype=acc, device=dy.device)
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
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y = x·W_deqᵀ + b + Σ_a s_a·(x̂_a·A_aᵀ·B_aᵀ + b_Ba); returns (y, [S_a] + kept masks).

    Args:
        x: (M, K) fp16/bf16/fp32/fp64.  packed … shape: the 4-bit weight (module docstring), shape = [N, K].
        bias: (N,) in x's dtype, or None.  lora_a … seeds: as ``lora.lora_linear_fwd`` (masks kept on CPU).
    The base product is computed chunk by chunk, then ``lora.add_lora_fwd`` adds the LoRA terms.
    """
    quant = _quant(packed, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, shape)
    y = _base_forward(x, quant, bias)
    return add_lora_fwd(y, x, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds, keeps_masks(x))


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
