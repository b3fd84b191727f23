"""lora_linear_inference, the one-adapter inference form of lora_linear_fwd (x (*, K) as given, y (*, N) only).

The reference against an independent fp64 formula (2x rule of tests/_tolerances.py, the eager side being
lora_linear_fwd's y, the spec) on awkward leading shapes, both of its paths (N-D decode sizes unfused, larger or
mixed-precision inputs flattened), dense and int8 weights; opcheck of the registered op; which op a functional
call takes; and the dispatcher's derived implementation (a backend without its own kernel runs lora_linear_fwd).
"""

from __future__ import annotations

import pytest
import torch
from _inputs import LoraCase, make_lora_inputs
from _tolerances import assert_close_to_ref, truth_dtype

from peft_kernels import ops
from peft_kernels.backends.reference import lora as ref
from peft_kernels.ops import _dispatch

# (leading shape of x, K, N, r, dtype, adapter dtype, bias, lora_bias). M = prod(leading); the reference unfuses
# only N-D inputs of at most DECODE_TOKENS_MAX rows whose dtypes all equal their accumulator (fp32 / fp64).
CASES = {
    "3d-decode-fp32": ((5, 1), 59, 97, 8, torch.float32, torch.float32, True, False),
    "4d-fp64-lorabias": ((2, 3, 2), 33, 17, 17, torch.float64, torch.float64, True, True),
    "2d-fp32-nobias": ((7,), 123, 8, 1, torch.float32, torch.float32, False, True),
    "3d-rows-past-the-unfused-limit": ((3, 29), 40, 33, 4, torch.float32, torch.float32, True, False),
    "3d-bf16": ((4, 3), 59, 97, 16, torch.bfloat16, torch.bfloat16, True, False),
    "3d-fp16-fp32-adapters": ((2, 5), 33, 40, 8, torch.float16, torch.float32, True, True),
}


def _inputs(name):
    lead, k, n, r, dtype, a_dtype, bias, lora_bias = CASES[name]
    m = int(torch.tensor(lead).prod())
    inp = make_lora_inputs(LoraCase(name, m, k, n, r, dtype, a_dtype, bias=bias, lora_bias=lora_bias))
    inp["x"] = inp["x"].reshape(*lead, k)
    return inp


def _truth(inp, weight=None):
    acc = truth_dtype(inp["x"].dtype)
    x = inp["x"].to(acc)
    w = (inp["weight"] if weight is None else weight).to(acc)
    y = x @ w.t() + inp["scaling"] * (x @ inp["lora_a"].to(acc).t() @ inp["lora_b"].to(acc).t())
    if inp["bias"] is not None:
        y = y + inp["bias"].to(acc)
    if inp["lora_b_bias"] is not None:
        y = y + inp["scaling"] * inp["lora_b_bias"].to(acc)
    return y


def _spec_y(inp, weight_scale=None, weight=None):
    """lora_linear_fwd's y on x flattened to (M, K): the spec the inference form must equal."""
    x = inp["x"]
    y, _ = ref.lora_linear_fwd(
        x.reshape(-1, x.shape[-1]), inp["weight"] if weight is None else weight, inp["bias"], [inp["lora_a"]],
        [inp["lora_b"]], [inp["lora_b_bias"]], [inp["scaling"]], [0.0], None, weight_scale,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], y.shape[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_the_formula_and_the_forward_op(name):
    inp = _inputs(name)
    out = torch.ops.peft_kernels.lora_linear_inference(
        inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"], inp["scaling"], inp["lora_b_bias"]
    )
    assert out.shape == (*inp["x"].shape[:-1], inp["weight"].shape[0]) and out.dtype == inp["x"].dtype
    assert_close_to_ref(out, _spec_y(inp), _truth(inp), inp["x"].dtype, name)


def test_int8_weight():
    inp = _inputs("3d-decode-fp32")
    weight_int8 = torch.randint(-127, 128, inp["weight"].shape, dtype=torch.int8)
    weight_scale = torch.rand(inp["weight"].shape[0]) / 127
    dequantized = weight_int8.float() * weight_scale[:, None]
    out = torch.ops.peft_kernels.lora_linear_inference(
        inp["x"], weight_int8, inp["bias"], inp["lora_a"], inp["lora_b"], inp["scaling"], None, weight_scale
    )
    spec = _spec_y(inp, weight_scale, weight_int8)
    assert_close_to_ref(out, spec, _truth(inp, dequantized), torch.float32, "int8")


@pytest.mark.parametrize("name", ["3d-decode-fp32", "3d-fp16-fp32-adapters"])
def test_opcheck(name):
    inp = _inputs(name)
    args = (inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"], inp["scaling"], inp["lora_b_bias"])
    torch.library.opcheck(torch.ops.peft_kernels.lora_linear_inference.default, args)


def _count_ops(monkeypatch):
    calls = []
    for op_name in ("lora_linear_fwd", "lora_linear_inference"):
        real = getattr(ref, op_name)
        monkeypatch.setattr(ref, op_name, lambda *a, _real=real, _name=op_name: calls.append(_name) or _real(*a))
    _dispatch.clear_choices()
    return calls


def test_functional_op_takes_the_inference_form_only_for_one_adapter_without_grad_or_dropout(monkeypatch):
    calls = _count_ops(monkeypatch)
    x, w = torch.randn(2, 3, 16), torch.randn(8, 16)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(8, 4)
    with torch.no_grad():
        y = ops.lora_linear(x, w, None, a, b, 2.0, dropout_p=0.1)  # not training: no dropout applies
    assert calls == ["lora_linear_inference"] and y.shape == (2, 3, 8)
    calls.clear()
    with torch.no_grad():
        ops.lora_linear(x, w, None, a, b, 2.0, dropout_p=0.1, training=True)  # dropout: the general forward
        ops.lora_linear_multi(x, w, None, [a, a], [b, b], [None, None], [1.0, 2.0], [0.0, 0.0])  # two adapters
    ops.lora_linear(x, w, None, a, b, 2.0)  # A requires grad: the autograd Function
    assert calls == ["lora_linear_fwd"] * 3


def test_a_backend_without_its_own_kernel_runs_the_forward_op(monkeypatch):
    """DERIVED: the capability check and the function of lora_linear_fwd, on the translated call, y reshaped."""
    module = _dispatch._module("reference", "lora_linear_fwd")
    derived = _dispatch._Derived("lora_linear_inference", module)
    inp = _inputs("3d-bf16")
    args = (inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"], inp["scaling"], inp["lora_b_bias"])
    calls = _count_ops(monkeypatch)
    out = derived.lora_linear_inference(*args)
    assert calls == ["lora_linear_fwd"]
    assert torch.equal(out, _spec_y(inp))
    seen = []
    monkeypatch.setattr(module, "not_supported_reasons", lambda op, *a: seen.append((op, a[0].shape)) or ["no"])
    assert derived.not_supported_reasons("lora_linear_inference", *args) == ["no"]
    assert seen == [("lora_linear_fwd", (12, 59))]


def test_derived_op_is_listed_where_the_target_has_a_kernel():
    """peft-kernels info: lora_linear_inference is available wherever lora_linear_fwd has a kernel."""
    rows = {(op, dev): dict(entries) for op, dev, entries in _dispatch.backend_table()}
    for device_type in ("cuda", "cpu"):
        fwd, inference = rows[("lora_linear_fwd", device_type)], rows[("lora_linear_inference", device_type)]
        assert [name for name in inference] == [name for name in fwd]
        for name in fwd:
            assert (inference[name] == "no kernel") == (fwd[name] == "no kernel")


@pytest.mark.parametrize("m, expected", [(1, "cuda"), (16, "cuda"), (17, "triton")])
def test_cuda_tensors_decode_rows_of_the_inference_form_go_to_the_cuda_op(pretend_cuda, m, expected):
    """The same choice as lora_linear_fwd's (tests/kernels/test_ops_lora.py): decode rows to the CUDA GEMV, larger
    M to Triton, each through its lora_linear_fwd check on the flattened call."""
    x = torch.randn(m, 1, 64, dtype=torch.bfloat16)  # (*, K): flattened to (m, 64) for the checks
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    a, b = torch.randn(8, 64, dtype=torch.bfloat16), torch.randn(32, 8, dtype=torch.bfloat16)
    assert _dispatch.chosen_backend("lora_linear_inference", x, w, None, a, b, 1.0) == expected
