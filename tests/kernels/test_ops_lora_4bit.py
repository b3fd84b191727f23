"""lora_linear_4bit_{fwd,bwd}: the reference decode bit for bit against bitsandbytes' dequantize_4bit, the op and
its gradients against an independent fp64/fp32 truth on bnb's dequantized weight, dropout against the 16-bit op,
the chunked CPU path's peak memory, and the errors of bad inputs.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _tolerances import assert_close_to_ref, truth_dtype

from peft_kernels.backends.reference import lora_4bit as ref4
from peft_kernels.bench.measure import cpu_allocations
from peft_kernels.ops import lora_linear, lora_linear_4bit, quant_operands

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")

# (N, K): K not a multiple of 64 or 128 (blocks cross rows), N·K not a multiple of the blocksize (a partial last
# block), a K that is; N ≥ 64 so the chunked path has several chunks.
DECODE_SHAPES = [(33, 70), (17, 96), (130, 40), (64, 128)]
FORMATS = list(itertools.product(["nf4", "fp4"], [False, True], [64, 128], [torch.uint8, torch.bfloat16]))


def _fmt_id(fmt):
    qt, nested, bs, storage = fmt
    return f"{qt}-{'nested' if nested else 'flat'}-b{bs}-{str(storage).split('.')[-1]}"


def _quantize(weight, quant_type="nf4", nested=True, blocksize=64, storage=torch.uint8):
    return bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type, quant_storage=storage
    )


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_is_bnb_bit_for_bit(fmt, dtype):
    quant_type, nested, blocksize, storage = fmt
    torch.manual_seed(0)
    for n, k in DECODE_SHAPES:
        if storage != torch.uint8 and -(-n * k // 2) % storage.itemsize:
            continue  # bnb cannot store an odd byte count as bf16 (its quantize_4bit raises)
        packed, state = _quantize(torch.randn(n, k, dtype=dtype), quant_type, nested, blocksize, storage)
        expected = bnb_functional.dequantize_4bit(packed, state)
        quant = quant_operands(packed, state)
        assert torch.equal(ref4.dequantize_4bit(*quant, dtype=dtype), expected), (n, k)
        # Row ranges that start and end inside a block (the chunked path's slices).
        for r0, r1 in [(1, n - 1), (n // 3, n // 2 + 1), (n - 1, n)]:
            got = ref4.decode_4bit_rows(*quant, dtype, r0, r1)
            assert torch.equal(got, expected[r0:r1]), (n, k, r0, r1)


# Even K (bnb's native kernel needs it): K = 2048, K = 128, K = 70 and 96 (blocks cross rows: row chunks on a block
# boundary), a partial last block.
NATIVE_SHAPES = [(24, 2048), (96, 128), (130, 70), (130, 96)]


@pytest.mark.parametrize("route", ["c_function", "op"])
@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_chunk_decode_is_the_torch_decode_bit_for_bit(fmt, dtype, route, monkeypatch):
    """The CPU path's row chunks from bnb's native kernel (its C function called directly into one reused buffer,
    or its registered op where that function is absent) equal the torch decode's."""
    if not ref4._native_kernel_registered():
        pytest.skip("bitsandbytes has no native CPU dequantize_4bit kernel here: only the torch decode runs")
    assert "native" in ref4.cpu_decoder()
    if route == "op":
        monkeypatch.setattr(ref4, "_bnb_c_function", lambda name: None)
    elif ref4._bnb_c_function("cdequantize_blockwise_cpu_nf4_fp32") is None:
        pytest.skip("this bitsandbytes' native library has no cdequantize_blockwise_cpu_* function: its op serves")
    monkeypatch.setattr(ref4, "MIN_CHUNK_BYTES", 1)  # several chunks even at these sizes
    quant_type, nested, blocksize, storage = fmt
    torch.manual_seed(4)
    for n, k in NATIVE_SHAPES:
        if storage != torch.uint8 and -(-n * k // 2) % storage.itemsize:
            continue
        packed, state = _quantize(torch.randn(n, k, dtype=dtype), quant_type, nested, blocksize, storage)
        quant = ref4._quant(*quant_operands(packed, state))
        assert ref4._native_quant_type(quant[5], k, dtype) == quant_type
        expected = ref4.dequantize_4bit(*quant, dtype=dtype)  # the spec (torch decode), bnb's bit for bit above
        rows = [w.clone() for _, _, w in ref4._row_chunks(quant, dtype)]  # each chunk is valid until the next
        assert len(rows) > 1 and torch.equal(torch.cat(rows), expected), (n, k)
    # A table that is neither bnb's NF4 nor FP4 goes to the torch decode.
    assert ref4._native_quant_type(quant[5] * 0.5, k, dtype) is None


@pytest.mark.slow  # bnb decodes odd K with a torch.compile'd fallback: ~12 s of compilation on 2 cores
def test_decode_odd_k_and_odd_element_count():
    """K odd and N·K odd: the last byte holds one element (bnb's fallback decode)."""
    torch.manual_seed(1)
    packed, state = _quantize(torch.randn(3, 5), "fp4", nested=False)
    expected = bnb_functional.dequantize_4bit(packed, state)
    assert torch.equal(ref4.dequantize_4bit(*quant_operands(packed, state), dtype=torch.float32), expected)


# (M, K, N, r): decode row, K not a multiple of the blocksize, N ≥ 64 (several chunks), r = 1, a backward on column
# chunks (K = 2048).
OP_SHAPES = {"m1": (1, 96, 70, 8), "m7_k70": (7, 70, 130, 1), "m33": (33, 200, 64, 16), "m5_k2048": (5, 2048, 24, 4)}


def _op_inputs(shape_id, dtype, quant_type="nf4", nested=True, bias=True):
    m, k, n, r = OP_SHAPES[shape_id]
    packed, state = _quantize(torch.randn(n, k) / k**0.5, quant_type, nested)
    inp = {
        "x": torch.randn(m, k, dtype=dtype, requires_grad=True),
        "bias": (torch.randn(n) * 0.1).to(dtype) if bias else None,
        "lora_a": (torch.randn(r, k) / k**0.5).to(dtype).requires_grad_(),
        "lora_b": (torch.randn(n, r) * 0.1).to(dtype).requires_grad_(),
    }
    return inp, packed, state


def _truth(inp, w_deq, scaling, acc):
    """Independent formula in acc on bnb's dequantized weight: x·Wᵀ + b + s·x·Aᵀ·Bᵀ."""
    x = inp["x"].detach().to(acc).requires_grad_()
    a = inp["lora_a"].detach().to(acc).requires_grad_()
    b = inp["lora_b"].detach().to(acc).requires_grad_()
    y = x @ w_deq.to(acc).t() + scaling * (x @ a.t()) @ b.t()
    if inp["bias"] is not None:
        y = y + inp["bias"].to(acc)
    return y, (x, a, b)


@pytest.mark.parametrize("shape_id", list(OP_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_op_forward_and_gradients(shape_id, dtype, quant_type, nested, monkeypatch):
    monkeypatch.setattr(ref4, "MIN_CHUNK_BYTES", 1)  # several row chunks even at these sizes
    torch.manual_seed(2)
    inp, packed, state = _op_inputs(shape_id, dtype, quant_type, nested)
    scaling = 0.75
    y = lora_linear_4bit(inp["x"], packed, state, inp["bias"], inp["lora_a"], inp["lora_b"], scaling)
    dy = torch.randn_like(y)
    y.backward(dy)
    w_deq = bnb_functional.dequantize_4bit(packed, state).to(dtype)  # the op's W_deq: rounded once to x's dtype
    truth_y, truth_leaves = _truth(inp, w_deq, scaling, truth_dtype(dtype))
    truth_y.backward(dy.to(truth_y.dtype))
    eager_y, eager_leaves = _truth(inp, w_deq, scaling, dtype)
    eager_y.backward(dy)
    assert_close_to_ref(y.detach(), eager_y.detach(), truth_y.detach(), dtype, "y")
    with torch.no_grad():  # inference calls take the forward op alone (no autograd node): the same y
        y_inference = lora_linear_4bit(inp["x"], packed, state, inp["bias"], inp["lora_a"], inp["lora_b"], scaling)
    assert y_inference.grad_fn is None and torch.equal(y_inference, y.detach())
    for name, leaf in zip(("x", "lora_a", "lora_b"), range(3)):
        got = inp[name].grad
        assert_close_to_ref(got, eager_leaves[leaf].grad, truth_leaves[leaf].grad, dtype, f"d{name}")


def test_op_dropout_matches_16bit_op_on_the_dequantized_weight():
    """Same seed, same masks: the 4-bit op with dropout equals lora_linear on bnb's dequantized weight (fp32)."""
    inp, packed, state = _op_inputs("m33", torch.float32)
    w_deq = bnb_functional.dequantize_4bit(packed, state)
    results = []
    for fn in (
        lambda i: lora_linear_4bit(i["x"], packed, state, i["bias"], i["lora_a"], i["lora_b"], 2.0, 0.3, True),
        lambda i: lora_linear(i["x"], w_deq, i["bias"], i["lora_a"], i["lora_b"], 2.0, 0.3, True),
    ):
        leaves = {
            k: v.detach().clone().requires_grad_(v.requires_grad) if v is not None else None for k, v in inp.items()
        }
        torch.manual_seed(7)
        y = fn(leaves)
        y.backward(torch.ones_like(y))
        results.append([y.detach(), leaves["x"].grad, leaves["lora_a"].grad, leaves["lora_b"].grad])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(results[0][0], lora_linear(inp["x"], w_deq, inp["bias"], inp["lora_a"], inp["lora_b"], 2.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # backward on row chunks, on column chunks
def test_cpu_path_never_builds_the_dequantized_weight(dtype):
    """Extra peak of one forward + backward ≤ 1/8 of the dequantized weight's bytes, beyond activations.

    Measured with the profiler's allocator timeline, which sees the allocations inside the registered op (a
    TorchDispatchMode sees only the op's outputs)."""
    torch.manual_seed(3)
    m, k, n, r = 4, 1024, 4096, 8  # N·K = 4M elements: where the 1/8 bound starts (chunk_rows' floor)
    packed, state = _quantize(torch.randn(n, k, dtype=dtype), "nf4", nested=True)
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    a = (torch.randn(r, k) * 0.01).to(dtype).requires_grad_()
    b = torch.zeros(n, r, dtype=dtype, requires_grad=True)

    def peak(fn):
        return cpu_allocations(lambda: fn().sum().backward())[1]

    dequantized_bytes = n * k * dtype.itemsize
    peak_4bit = peak(lambda: lora_linear_4bit(x, packed, state, None, a, b, 1.0))
    # The 16-bit op on a weight that already exists: its peak is the activations' (y, dY, dx, fp32 copies).
    w_deq = bnb_functional.dequantize_4bit(packed, state)
    peak_16bit = peak(lambda: lora_linear(x, w_deq, None, a, b, 1.0))
    assert peak_4bit - peak_16bit <= dequantized_bytes / 8, (peak_4bit, peak_16bit, dequantized_bytes)
    # The measurement sees a dequantized weight when one is made (bnb's own path makes it): the test can fail.
    peak_bnb = peak(lambda: torch.nn.functional.linear(x, bnb_functional.dequantize_4bit(packed, state).to(dtype)))
    assert peak_bnb >= dequantized_bytes


def test_bad_inputs_raise_clear_errors():
    packed, state = _quantize(torch.randn(64, 96), "nf4")
    x, a, b = torch.randn(2, 96), torch.randn(4, 96), torch.randn(64, 4)
    with pytest.raises(ValueError, match="x has 95 features"):
        lora_linear_4bit(torch.randn(2, 95), packed, state, None, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_b has shape"):
        lora_linear_4bit(x, packed, state, None, a, torch.randn(63, 4), 1.0)
    state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        lora_linear_4bit(x, packed, state, None, a, b, 1.0)
