"""lora_linear_int8_{fwd,bwd}: reference against an independent fp32/fp64 truth on the dequantized weight, every
other backend against the reference (2x rule), gradients, opcheck, bnb dequantization and SQNR (docs/KERNELS.md §6, §11).
"""

from __future__ import annotations

import pytest
import torch
from _tolerances import (
    FP32_SAME_MATH,
    INT8_MIN_SQNR_DB,
    INT8_SCALE_FOLD_MAX_ULPS,
    assert_close,
    assert_close_to_ref,
    sqnr_db,
    truth_dtype,
)

from peft_kernels.backends.reference import lora_int8 as ref_int8
from peft_kernels.ops import LoraLinearInt8Function, _dispatch, lora_linear, lora_linear_int8, lora_linear_int8_multi

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")

# (M, K, N, r): decode rows, M < 16, K not a multiple of 16, odd N, r = 1 and 17.
SHAPES = {
    "decode": (1, 64, 97, 8),
    "m7_k59": (7, 59, 97, 1),
    "m16_r17": (16, 123, 431, 17),
    "m127": (127, 96, 40, 16),
}
HALF_DTYPES = [torch.float16, torch.bfloat16]


def _backend_params():
    params = [pytest.param("reference", "cpu", id="reference-cpu")]
    params += [pytest.param(name, "cuda", id=f"{name}-cuda", marks=pytest.mark.gpu) for name in ("triton", "cuda")]
    return params


def _skip_unless_runs(backend, op_name, *args):
    reasons = _dispatch.call_reasons(backend, op_name, *args)
    if reasons:
        pytest.skip(f"{backend} does not run this call: {'; '.join(reasons)}")


def _quantize(weight: torch.Tensor):
    """bitsandbytes' own row-wise quantizer (what Int8Params does): CB int8 (N, K), SCB fp32 (N,)."""
    cb, scb, _ = bnb_functional.int8_vectorwise_quant(weight.to(torch.float16))
    return cb, scb


def _inputs(shape_id, dtype, device, adapter_dtype=None, bias=True, lora_b_bias=False):
    m, k, n, r = SHAPES[shape_id]
    adapter_dtype = adapter_dtype or dtype
    weight = torch.randn(n, k) / k**0.5
    cb, scb = _quantize(weight)
    inputs = {
        "x": torch.randn(m, k).to(device, dtype),
        "weight_int8": cb.to(device),
        "weight_scale": ref_int8.bnb_weight_scale(scb).to(device),
        "bias": (torch.randn(n) * 0.1).to(device, dtype) if bias else None,
        "lora_a": (torch.randn(r, k) / k**0.5).to(device, adapter_dtype),
        "lora_b": (torch.randn(n, r) * 0.1).to(device, adapter_dtype),
        "lora_b_bias": (torch.randn(n) * 0.1).to(device, adapter_dtype) if lora_b_bias else None,
        "scaling": 0.75,
    }
    return inputs, weight


def _truth_forward(inp, acc):
    """Independent formula in acc: x·W_deqᵀ + b + s·(x·Aᵀ·Bᵀ + b_B), W_deq = CB·scale (no reference code)."""
    x = inp["x"].to(acc)
    w = inp["weight_int8"].to(acc) * inp["weight_scale"].to(acc)[:, None]
    y = x @ w.t() + inp["scaling"] * ((x @ inp["lora_a"].to(acc).t()) @ inp["lora_b"].to(acc).t())
    if inp["bias"] is not None:
        y = y + inp["bias"].to(acc)
    if inp["lora_b_bias"] is not None:
        y = y + inp["scaling"] * inp["lora_b_bias"].to(acc)
    return y


def _eager_forward(inp, dtype):
    """docs/KERNELS.md §11 eager baseline: F.linear on W_deq rounded to dtype, LoRA in dtype."""
    x = inp["x"].to(dtype)
    w = (inp["weight_int8"].float() * inp["weight_scale"][:, None]).to(dtype)
    bias = inp["bias"].to(dtype) if inp["bias"] is not None else None
    lora = (x @ inp["lora_a"].to(dtype).t()) @ inp["lora_b"].to(dtype).t()
    if inp["lora_b_bias"] is not None:
        lora = lora + inp["lora_b_bias"].to(dtype)
    return torch.nn.functional.linear(x, w, bias) + inp["scaling"] * lora


def _call(inp, backend=None, **overrides):
    args = {**inp, **overrides}
    return lora_linear_int8(
        args["x"],
        args["weight_int8"],
        args["weight_scale"],
        args["bias"],
        args["lora_a"],
        args["lora_b"],
        args["scaling"],
        backend=backend,
        lora_b_bias=args["lora_b_bias"],
    )


# ---- forward ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
@pytest.mark.parametrize("lora_b_bias", [False, True])
def test_reference_forward_matches_truth(shape_id, dtype, lora_b_bias):
    inp, _ = _inputs(shape_id, dtype, "cpu", lora_b_bias=lora_b_bias)
    out = _call(inp, backend="reference")
    assert out.dtype == dtype and out.shape == (SHAPES[shape_id][0], SHAPES[shape_id][2])
    truth = _truth_forward(inp, truth_dtype(dtype))
    assert_close_to_ref(out, _eager_forward(inp, dtype), truth, dtype, "y")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_reference_forward_fp32_adapters(dtype):
    """PEFT's default placement: fp32 adapters on a 16-bit base; S is fp32."""
    inp, _ = _inputs("m16_r17", dtype, "cpu", adapter_dtype=torch.float32)
    y, saved_s = torch.ops.peft_kernels.lora_linear_int8_fwd(
        inp["x"], inp["weight_int8"], inp["weight_scale"], inp["bias"], [inp["lora_a"]], [inp["lora_b"]], [None],
        [inp["scaling"]], [0.0], None,
    )  # fmt: skip
    assert y.dtype == dtype and saved_s[0].dtype == torch.float32
    assert_close_to_ref(y, _eager_forward(inp, dtype), _truth_forward(inp, torch.float32), dtype, "y")


def test_reference_equals_lora_linear_on_dequantized_weight():
    """The int8 op is lora_linear on W_deq = (CB·scale).to(x.dtype): bitwise, for the same inputs."""
    inp, _ = _inputs("m16_r17", torch.bfloat16, "cpu")
    w_deq = ref_int8.dequantize_int8(inp["weight_int8"], inp["weight_scale"], torch.bfloat16)
    expected = lora_linear(inp["x"], w_deq, inp["bias"], inp["lora_a"], inp["lora_b"], inp["scaling"])
    assert torch.equal(_call(inp, backend="reference"), expected)


@pytest.mark.parametrize("backend, device", _backend_params())
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_backend_forward_matches_reference(backend, device, shape_id, dtype):
    if _dispatch.unavailable_reason(backend) is not None:
        pytest.skip(_dispatch.unavailable_reason(backend))
    inp, _ = _inputs(shape_id, dtype, device, lora_b_bias=True)
    args = (inp["x"], inp["weight_int8"], inp["weight_scale"], inp["bias"], [inp["lora_a"]], [inp["lora_b"]])
    _skip_unless_runs(backend, "lora_linear_int8_fwd", *args, [inp["lora_b_bias"]], [0.75], [0.0], None)
    out = _call(inp, backend=backend)
    assert_close_to_ref(out, _eager_forward(inp, dtype), _truth_forward(inp, torch.float32), dtype, backend)


# ---- backward --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape_id", ["decode", "m16_r17", "m127"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_reference_gradients_match_truth(shape_id, dtype):
    inp, _ = _inputs(shape_id, dtype, "cpu", lora_b_bias=True)
    leaves = {name: inp[name].clone().requires_grad_() for name in ("x", "bias", "lora_a", "lora_b", "lora_b_bias")}
    acc = truth_dtype(dtype)
    truth_leaves = {name: t.detach().to(acc).requires_grad_() for name, t in leaves.items()}
    eager_leaves = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
    dy = torch.randn(SHAPES[shape_id][0], SHAPES[shape_id][2])

    _call(inp, backend="reference", **leaves).backward(dy.to(dtype))
    _truth_forward({**inp, **truth_leaves}, acc).backward(dy.to(acc))
    _eager_forward({**inp, **eager_leaves}, dtype).backward(dy.to(dtype))
    for name in leaves:
        grad = leaves[name].grad
        assert grad is not None and grad.dtype == dtype, name
        assert_close_to_ref(grad, eager_leaves[name].grad, truth_leaves[name].grad, dtype, f"d{name}")


def test_gradcheck_fp64_with_dropout():
    """fp64 chain rule of LoraLinearInt8Function, dropout on (fixed seed, so every evaluation sees one mask)."""
    inp, _ = _inputs("m7_k59", torch.float64, "cpu", lora_b_bias=True)
    seeds = torch.tensor([1234], dtype=torch.int64)
    meta = ([0.75], [0.25])

    def fn(x, bias, a, b, bb):
        return LoraLinearInt8Function.apply(meta, x, inp["weight_int8"], inp["weight_scale"], bias, seeds, a, b, bb)

    leaves = [inp[n].detach().requires_grad_() for n in ("x", "bias", "lora_a", "lora_b", "lora_b_bias")]
    assert torch.autograd.gradcheck(fn, leaves)


def test_needs_input_grad_gating():
    """No dx when x does not require grad; no gradient can reach the frozen int8 weight or its scale."""
    inp, _ = _inputs("m16_r17", torch.float32, "cpu")
    a = inp["lora_a"].clone().requires_grad_()
    _call(inp, backend="reference", lora_a=a).sum().backward()
    assert a.grad is not None and not inp["x"].requires_grad
    dx, d_a, d_b = torch.ops.peft_kernels.lora_linear_int8_bwd(
        torch.ones(16, 431), inp["x"], inp["weight_int8"], inp["weight_scale"], [inp["lora_a"]], [inp["lora_b"]],
        [torch.zeros(16, 17)], [0.75], [0.0], None, [False, True],
    )  # fmt: skip
    assert dx is None and len(d_a) == 1 and len(d_b) == 1
    dx, d_a, d_b = torch.ops.peft_kernels.lora_linear_int8_bwd(
        torch.ones(16, 431), inp["x"], inp["weight_int8"], inp["weight_scale"], [inp["lora_a"]], [inp["lora_b"]],
        [torch.zeros(16, 17)], [0.75], [0.0], None, [True, False],
    )  # fmt: skip
    assert dx is not None and d_a == [] and d_b == []


def test_multi_adapter_is_sum_of_single_adapters():
    inp, _ = _inputs("m16_r17", torch.float64, "cpu")
    a2, b2 = torch.randn(3, 123, dtype=torch.float64), torch.randn(431, 3, dtype=torch.float64)
    both = lora_linear_int8_multi(
        inp["x"], inp["weight_int8"], inp["weight_scale"], None, [inp["lora_a"], a2], [inp["lora_b"], b2],
        [None, None], [0.75, 2.0], [0.0, 0.0],
    )  # fmt: skip
    base = lora_linear_int8(
        inp["x"], inp["weight_int8"], inp["weight_scale"], None, inp["lora_a"], inp["lora_b"], 0.75
    )
    assert_close(both, base + 2.0 * (inp["x"] @ a2.t()) @ b2.t(), FP32_SAME_MATH, "two adapters")


# ---- registered ops --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpu(dtype):
    inp, _ = _inputs("m7_k59", dtype, "cpu", lora_b_bias=True)
    fwd_args = (
        inp["x"], inp["weight_int8"], inp["weight_scale"], inp["bias"], [inp["lora_a"]], [inp["lora_b"]],
        [inp["lora_b_bias"]], [0.75], [0.1], torch.tensor([7], dtype=torch.int64),
    )  # fmt: skip
    torch.library.opcheck(torch.ops.peft_kernels.lora_linear_int8_fwd.default, fwd_args)
    _, saved_s = torch.ops.peft_kernels.lora_linear_int8_fwd(*fwd_args)
    bwd_args = (
        torch.randn(7, 97, dtype=dtype), inp["x"], inp["weight_int8"], inp["weight_scale"], [inp["lora_a"]],
        [inp["lora_b"]], saved_s, [0.75], [0.1], fwd_args[-1], [True, True],
    )  # fmt: skip
    torch.library.opcheck(torch.ops.peft_kernels.lora_linear_int8_bwd.default, bwd_args)


def test_invalid_weight_format_raises():
    inp, _ = _inputs("decode", torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight_scale"):
        _call(inp, weight_scale=inp["weight_scale"][:-1])
    with pytest.raises(ValueError, match="int8"):
        _call(inp, weight_int8=inp["weight_int8"].float())


# ---- bitsandbytes format and quantization error ----------------------------------------------------------------


@pytest.mark.parametrize("n, k", [(97, 59), (431, 123), (256, 1024)])
def test_dequant_bit_identical_to_bitsandbytes(n, k):
    """bnb's int8_vectorwise_dequant is (CB·SCB)·7.874015718698502e-3 in fp32 (bitsandbytes/_ops.py)."""
    cb, scb = _quantize(torch.randn(n, k) * torch.rand(n, 1) * 10)
    expected = bnb_functional.int8_vectorwise_dequant(cb, scb)
    assert torch.equal(ref_int8.dequantize_bnb_int8(cb, scb), expected)
    assert torch.equal(ref_int8.bnb_weight_scale(scb), scb * 7.874015718698502e-3)
    # The op's format folds 1/127 into the scale: one fp32 rounding apart from bnb, same sign, never more.
    ours = ref_int8.dequantize_int8(cb, ref_int8.bnb_weight_scale(scb), torch.float32)
    ulps = (ours.view(torch.int32).long() - expected.view(torch.int32).long()).abs()
    assert ulps.max().item() <= INT8_SCALE_FOLD_MAX_ULPS
    assert torch.equal(ours == 0, expected == 0)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("m, k, n", [(16, 1024, 431), (7, 123, 431)])
def test_sqnr_against_unquantized_weights(dtype, m, k, n):
    """Output SQNR of W8A16 vs the fp32 model with unquantized weights (≈42-45 dB measured on these shapes)."""
    weight = torch.randn(n, k) / k**0.5
    cb, scb = _quantize(weight)
    x, a, b = torch.randn(m, k), torch.randn(8, k) / k**0.5, torch.randn(n, 8) * 0.1
    truth = x @ weight.t() + 2.0 * (x @ a.t()) @ b.t()
    out = lora_linear_int8(x.to(dtype), cb, ref_int8.bnb_weight_scale(scb), None, a.to(dtype), b.to(dtype), 2.0)
    assert sqnr_db(truth, out) >= INT8_MIN_SQNR_DB
