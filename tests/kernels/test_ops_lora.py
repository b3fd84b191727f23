"""lora_linear_{fwd,bwd}: the reference against an independent hand formula (fp64 / fp32 truth), gradcheck in fp64
with and without dropout, opcheck of both registered ops, ``None`` exactly where ``needs_input_grad`` is False;
on CUDA every other backend against the reference (2x rule of tests/_tolerances.py) at realistic and awkward
shapes, and ``torch.compile(fullgraph=True)`` of ``ops.lora_linear`` (docs/KERNELS.md §11).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _inputs import GPU_CASES, LoraCase, make_lora_inputs, upcast
from _tolerances import FP32_SAME_MATH, HALF_SAME_MATH, assert_close, assert_close_to_ref, truth_dtype

from peft_kernels import ops
from peft_kernels.backends.reference import lora as ref
from peft_kernels.backends.reference.dropout import lora_dropout_mask, philox_on_cpu
from peft_kernels.ops import LoraLinearFunction, _dispatch

HAS_CUDA = torch.cuda.is_available()

# CPU cases for the reference: awkward sizes, each dtype placement, bias / lora_bias on and off, both layouts of W.
REFERENCE_CASES = (
    LoraCase("m7-k59-n97-r1-fp64", 7, 59, 97, 1, torch.float64, lora_bias=True),
    LoraCase("m16-k123-n8-r17-fp32-conv1d", 16, 123, 8, 17, layout="conv1d"),
    LoraCase("m1-k16-n431-r8-fp32-nobias", 1, 16, 431, 8, bias=False),
    LoraCase("m127-k59-n97-r16-bf16", 127, 59, 97, 16, torch.bfloat16),
    LoraCase("m7-k123-n97-r8-fp16-fp32adapters", 7, 123, 97, 8, torch.float16, torch.float32, lora_bias=True),
    LoraCase("m16-k59-n8-r17-bf16-fp32adapters-sliced", 16, 59, 8, 17, torch.bfloat16, torch.float32, layout="sliced"),
)


def _same_math_tol(dtype):
    return FP32_SAME_MATH if dtype in (torch.float32, torch.float64) else HALF_SAME_MATH[dtype]


def _seeds(p: float, device="cpu"):
    return torch.tensor([424242], dtype=torch.int64, device=device) if p > 0 else None


def _hand(inp, acc, seeds, dy=None):
    """Independent formula in ``acc`` (no reference code): y, S and, given dY, dx, dA, dB (docs/KERNELS.md §1)."""
    x, w = inp["x"].to(acc), inp["weight"].to(acc)
    a, b, s, p = inp["lora_a"].to(acc), inp["lora_b"].to(acc), inp["scaling"], inp["p"]
    scaled_keep = torch.ones_like(x)
    if p > 0:
        scaled_keep = lora_dropout_mask(seeds[0], *x.shape, p).to(acc) / (1 - p)
    x_hat = x * scaled_keep
    shrink = x_hat @ a.t()
    y = x @ w.t() + s * (shrink @ b.t())
    if inp["bias"] is not None:
        y = y + inp["bias"].to(acc)
    if inp["lora_b_bias"] is not None:
        y = y + s * inp["lora_b_bias"].to(acc)
    out = {"y": y, "S": shrink}
    if dy is not None:
        dy = dy.to(acc)
        d_shrink = s * dy @ b
        out.update(dx=dy @ w + scaled_keep * (d_shrink @ a), dA=d_shrink.t() @ x_hat, dB=s * dy.t() @ shrink)
    return out


def _reference(inp, seeds, dy):
    """(y, S, dx, dA, dB) of the registered ops, forced onto the reference (CUDA dispatch would pick Triton)."""
    fwd_args = (inp["x"], inp["weight"], inp["bias"], [inp["lora_a"]], [inp["lora_b"]], [inp["lora_b_bias"]])
    with _dispatch.force_backend("reference"):
        # saved: [S], then on CPU with p > 0 the kept mask (reference.lora.keeps_masks), read by the backward
        y, saved = torch.ops.peft_kernels.lora_linear_fwd(*fwd_args, [inp["scaling"]], [inp["p"]], seeds)
        shrink = saved[0]
        dx, (d_a,), (d_b,) = torch.ops.peft_kernels.lora_linear_bwd(
            dy, inp["x"], inp["weight"], [inp["lora_a"]], [inp["lora_b"]], saved, [inp["scaling"]], [inp["p"]],
            seeds, [True, True],
        )  # fmt: skip
    return {"y": y, "S": shrink, "dx": dx, "dA": d_a, "dB": d_b}


# ---- the reference (CPU) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=str)
def test_reference_matches_hand_formula(case, p):
    case = dataclasses.replace(case, p=p)
    inp = make_lora_inputs(case)
    seeds = _seeds(p)
    dy = torch.randn(case.M, case.N, generator=torch.Generator().manual_seed(1)).to(case.dtype)
    with philox_on_cpu():  # the spec's mask on CPU too, so the hand formula can regenerate it
        out = _reference(inp, seeds, dy)
    truth = _hand(inp, truth_dtype(case.dtype), seeds, dy)
    assert out["y"].dtype == case.dtype and out["dx"].dtype == case.dtype
    assert out["S"].dtype == torch.promote_types(case.a_dtype, torch.float32)
    assert out["dA"].dtype == case.a_dtype and out["dB"].dtype == case.a_dtype
    for name in truth:
        # Outputs rounded to the activation dtype (y, dx) get its tolerance; S, dA, dB live in the adapter dtype.
        dtype = case.dtype if name in ("y", "dx") else case.a_dtype
        scale = truth[name].abs().max().clamp_min(1.0)
        assert_close(out[name].double() / scale, truth[name].double() / scale, _same_math_tol(dtype), name)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_gradcheck_fp64(p):
    """fp64 chain rule of LoraLinearFunction (every input that trains), dropout on with a fixed seed."""
    case = LoraCase("gc", 5, 7, 6, 3, torch.float64, lora_bias=True)
    inp = make_lora_inputs(case)
    seeds = _seeds(p)
    meta = ([inp["scaling"]], [p])

    def fn(x, weight, bias, a, b, bb):
        return LoraLinearFunction.apply(meta, x, weight, bias, seeds, a, b, bb)

    names = ("x", "weight", "bias", "lora_a", "lora_b", "lora_b_bias")
    leaves = [inp[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(fn, leaves)


def _capture_output_mask(monkeypatch):
    seen = []
    real = ref.lora_linear_bwd

    def recording(*args, **kwargs):
        seen.append(list(args[-1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(ref, "lora_linear_bwd", recording)
    return seen


@pytest.mark.parametrize(
    "trainable, output_mask",
    [
        (("x",), [True, False]),
        (("lora_a",), [False, True]),
        (("lora_b",), [False, True]),
        (("lora_b_bias",), [False, False]),
        (("bias",), [False, False]),
        (("x", "lora_a", "lora_b", "lora_b_bias", "bias"), [True, True]),
    ],
)
def test_none_exactly_where_no_grad_is_needed(trainable, output_mask, monkeypatch):
    seen = _capture_output_mask(monkeypatch)
    case = LoraCase("ng", 6, 16, 9, 4, torch.float32, p=0.1, lora_bias=True)
    inp = make_lora_inputs(case)
    leaves = {n: inp[n].detach().clone().requires_grad_(n in trainable) for n in ("x", "weight", "bias")}
    leaves.update({n: inp[n].detach().clone().requires_grad_(n in trainable) for n in ("lora_a", "lora_b")})
    leaves["lora_b_bias"] = inp["lora_b_bias"].detach().clone().requires_grad_("lora_b_bias" in trainable)
    y = ops.lora_linear(
        leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"], 2.0, 0.1, training=True,
        lora_b_bias=leaves["lora_b_bias"],
    )  # fmt: skip
    y.sum().backward()
    for name, leaf in leaves.items():
        assert (leaf.grad is not None) == (name in trainable), name
    assert seen == [output_mask]


def test_trainable_weight_gets_dyt_x():
    """W.requires_grad (full fine-tuning): the Function adds dW = dYᵀ·x; the Triton backend declines such calls."""
    case = LoraCase("dw", 6, 16, 9, 4, torch.float64)
    inp = make_lora_inputs(case)
    w = inp["weight"].clone().requires_grad_()
    y = ops.lora_linear(inp["x"], w, None, inp["lora_a"], inp["lora_b"], 2.0)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close(w.grad, dy.t() @ inp["x"], FP32_SAME_MATH, "dW")


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype, a_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_opcheck_cpu(dtype, a_dtype, p):
    case = LoraCase("oc", 7, 59, 97, 8, dtype, a_dtype, p=p, lora_bias=True)
    inp = make_lora_inputs(case)
    seeds = _seeds(p)
    fwd_args = (
        inp["x"], inp["weight"], inp["bias"], [inp["lora_a"]], [inp["lora_b"]], [inp["lora_b_bias"]],
        [inp["scaling"]], [p], seeds,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.peft_kernels.lora_linear_fwd.default, fwd_args)
    _, saved_s = torch.ops.peft_kernels.lora_linear_fwd(*fwd_args)
    for output_mask in ([True, True], [True, False], [False, True]):
        bwd_args = (
            torch.randn(7, 97, dtype=dtype), inp["x"], inp["weight"], [inp["lora_a"]], [inp["lora_b"]], saved_s,
            [inp["scaling"]], [p], seeds, output_mask,
        )  # fmt: skip
        torch.library.opcheck(torch.ops.peft_kernels.lora_linear_bwd.default, bwd_args)


# ---- torch.compile ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, compile_backend",
    [pytest.param("cpu", "aot_eager", id="cpu-aot_eager"), pytest.param("cuda", "inductor", marks=pytest.mark.gpu)],
)
def test_compile_fullgraph(device, compile_backend):
    case = LoraCase("compile", 33, 64, 48, 8, torch.float32 if device == "cpu" else torch.bfloat16, p=0.1)
    inp = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in make_lora_inputs(case).items()}
    a = inp["lora_a"].clone().requires_grad_()
    b = inp["lora_b"].clone().requires_grad_()

    def fn(x, a, b):
        return ops.lora_linear(x, inp["weight"], inp["bias"], a, b, 2.0, 0.1, training=True)

    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    torch.manual_seed(3)
    y = compiled(inp["x"], a, b)
    y.sum().backward()
    a_eager, b_eager = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.manual_seed(3)
    y_eager = fn(inp["x"], a_eager, b_eager)
    y_eager.sum().backward()
    assert_close(y, y_eager, _same_math_tol(case.dtype), "y")
    assert_close(a.grad, a_eager.grad, _same_math_tol(case.dtype), "dA")


# ---- other backends against the reference (CUDA) ---------------------------------------------------------------


def _backend_call(backend, inp, seeds, dy):
    """(y, S, dx, dA, dB) of backend ``backend``'s functions called directly (no dispatch fallback)."""
    args = (inp["x"], inp["weight"], inp["bias"], [inp["lora_a"]], [inp["lora_b"]], [inp["lora_b_bias"]])
    y, (shrink,) = _dispatch.implementation(backend, "lora_linear_fwd")(*args, [inp["scaling"]], [inp["p"]], seeds)
    dx, (d_a,), (d_b,) = _dispatch.implementation(backend, "lora_linear_bwd")(
        dy, inp["x"], inp["weight"], [inp["lora_a"]], [inp["lora_b"]], [shrink], [inp["scaling"]], [inp["p"]], seeds,
        [True, True],
    )  # fmt: skip
    return {"y": y, "S": shrink, "dx": dx, "dA": d_a, "dB": d_b}


def _cast(inp, xd, ad):
    out = dict(inp)
    for n in ("x", "weight", "bias"):
        out[n] = upcast(inp[n], xd)
    for n in ("lora_a", "lora_b", "lora_b_bias"):
        out[n] = upcast(inp[n], ad)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_backend_matches_reference_cuda(backend, case):
    if _dispatch.unavailable_reason(backend) is not None:
        pytest.skip(_dispatch.unavailable_reason(backend))
    inp = make_lora_inputs(case, device="cuda")
    seeds = _seeds(case.p, "cuda")
    args = (inp["x"], inp["weight"], inp["bias"], [inp["lora_a"]], [inp["lora_b"]], [inp["lora_b_bias"]])
    reasons = _dispatch.call_reasons(backend, "lora_linear_fwd", *args, [inp["scaling"]], [inp["p"]], seeds)
    assert not reasons, reasons  # every GPU case is meant to run on the fused path
    dy = torch.randn(case.M, case.N, device="cuda", dtype=case.dtype)
    out = _backend_call(backend, inp, seeds, dy)
    eager = _reference(inp, seeds, dy)
    td = truth_dtype(case.dtype)
    truth = _reference(_cast(inp, td, td), seeds, dy.to(td))
    for name in out:
        assert out[name].dtype == eager[name].dtype, name
        assert_close_to_ref(out[name], eager[name], truth[name], case.dtype, f"{case.name}:{name}")


@pytest.mark.gpu
def test_triton_deterministic_mode_is_bitwise_reproducible_cuda():
    if _dispatch.unavailable_reason("triton") is not None:
        pytest.skip(_dispatch.unavailable_reason("triton"))
    case = LoraCase("det", 1000, 1024, 431, 17, torch.bfloat16, p=0.1)
    inp = make_lora_inputs(case, device="cuda")
    seeds = _seeds(case.p, "cuda")
    dy = torch.randn(case.M, case.N, device="cuda", dtype=case.dtype)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _backend_call("triton", inp, seeds, dy), _backend_call("triton", inp, seeds, dy)
    finally:
        torch.use_deterministic_algorithms(previous)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.gpu
def test_ops_lora_linear_autograd_cuda_matches_reference(monkeypatch):
    """ops.lora_linear on CUDA (automatic dispatch: Triton first) vs the same call with both ops pinned to the
    reference: y and every gradient. Pinned through PRIORITY because CUDA backward runs on autograd's device
    thread, where the forward's backend= choice (a ContextVar) is not visible."""
    if _dispatch.unavailable_reason("triton") is not None:
        pytest.skip(_dispatch.unavailable_reason("triton"))
    case = LoraCase("ops", 2 * 1025, 1024, 431, 16, torch.bfloat16, torch.float32, p=0.1, lora_bias=True)
    inp = make_lora_inputs(case, device="cuda")
    results = []
    for pinned in (None, "reference"):
        if pinned is not None:
            for op in ("lora_linear_fwd", "lora_linear_bwd"):
                monkeypatch.setitem(_dispatch.PRIORITY, op, (pinned,))
        leaves = {n: inp[n].clone().requires_grad_() for n in ("x", "bias", "lora_a", "lora_b", "lora_b_bias")}
        torch.manual_seed(9)  # same dropout seed for both calls
        y = ops.lora_linear(
            leaves["x"].view(2, 1025, -1), inp["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"], 2.0,
            0.1, training=True, lora_b_bias=leaves["lora_b_bias"],
        )  # fmt: skip
        y.backward(torch.ones_like(y))
        results.append((y, {n: t.grad for n, t in leaves.items()}))
    (y, grads), (y_ref, grads_ref) = results
    assert_close(y, y_ref, HALF_SAME_MATH[torch.bfloat16], "y")
    for name in grads:
        scale = grads_ref[name].abs().max().clamp_min(1.0)
        assert_close(grads[name] / scale, grads_ref[name] / scale, HALF_SAME_MATH[torch.bfloat16], f"d{name}")


# ---- automatic choice on CUDA tensors (capabilities monkeypatched: no GPU needed) ------------------------------


@pytest.mark.parametrize(
    "m, p, expected", [(1, 0.0, "cuda"), (16, 0.0, "cuda"), (17, 0.0, "triton"), (1, 0.1, "triton")]
)
def test_cuda_tensors_decode_rows_go_to_the_cuda_op_first(pretend_cuda, m, p, expected):
    """#15: on CUDA tensors M <= 16 (inference, fp16/bf16) runs the CUDA decode GEMV, dense or int8 weight; larger M
    and dropout go to Triton; the backward, which has no CUDA kernel, to Triton."""
    x = torch.randn(m, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    cb, scale = torch.randint(-127, 128, (32, 64), dtype=torch.int8), torch.rand(32)
    a, b = torch.randn(8, 64, dtype=torch.bfloat16), torch.randn(32, 8, dtype=torch.bfloat16)
    seeds = torch.tensor([5]) if p > 0 else None
    adapters = ([a], [b], [None], [1.0], [p], seeds)
    assert _dispatch.PRIORITY["lora_linear_fwd"][0] == "cuda"
    assert _dispatch.chosen_backend("lora_linear_fwd", x, w, None, *adapters) == expected
    assert _dispatch.chosen_backend("lora_linear_int8_fwd", x, cb, scale, None, *adapters) == expected
    dy, s = torch.randn(m, 32, dtype=torch.bfloat16), torch.zeros(m, 8)
    bwd_args = (dy, x, w, [a], [b], [s], [1.0], [p], seeds, [True, True])
    assert _dispatch.chosen_backend("lora_linear_bwd", *bwd_args) == "triton"


# ---- one route on every device: the CPU dropout masks travel through the ops ----------------------------------


def test_kept_masks_are_the_regenerated_ones_and_give_the_same_gradients():
    """On CPU the reference's forward op returns each adapter's 1-byte mask (p > 0 only) after the S_a; the backward
    op finds them in saved_s. Same bits as the mask regenerated from the seed (the backward given only the S_a),
    so the same gradients, bitwise."""
    case = LoraCase("km", 9, 33, 12, 4, torch.float32)
    inp = make_lora_inputs(case)
    a2, b2 = torch.randn(3, 33), torch.randn(12, 3)
    seeds = torch.tensor([11, 12], dtype=torch.int64)
    fwd = (inp["x"], inp["weight"], None, [inp["lora_a"], a2], [inp["lora_b"], b2], [None, None], [2.0, 0.5])
    dropout_p = [0.25, 0.0]  # the second adapter has no dropout, hence no mask
    y, saved = torch.ops.peft_kernels.lora_linear_fwd(*fwd, dropout_p, seeds)
    assert len(saved) == 3 and saved[2].dtype == torch.bool
    expected_mask = ref._keep_mask(inp["x"], 0.25, seeds, 0)
    assert torch.equal(saved[2], expected_mask) and 0 < int(saved[2].sum()) < saved[2].numel()
    dy = torch.randn(9, 12)
    bwd = (dy, inp["x"], inp["weight"], [inp["lora_a"], a2], [inp["lora_b"], b2])
    kept = torch.ops.peft_kernels.lora_linear_bwd(*bwd, saved, [2.0, 0.5], dropout_p, seeds, [True, True])
    regen = torch.ops.peft_kernels.lora_linear_bwd(*bwd, saved[:2], [2.0, 0.5], dropout_p, seeds, [True, True])
    assert torch.equal(kept[0], regen[0])
    for got, want in zip(kept[1] + kept[2], regen[1] + regen[2]):
        assert torch.equal(got, want)


def test_cpu_function_keeps_masks_and_calls_the_ops(monkeypatch):
    """ops.lora_linear on CPU with dropout goes through torch.ops (no side channel) and the forward keeps masks."""
    calls = []
    real = ref.lora_linear_fwd

    def recording(*args):
        y, saved = real(*args)
        calls.append(len(saved))  # S, then the kept mask
        return y, saved

    monkeypatch.setattr(ref, "lora_linear_fwd", recording)
    _dispatch.clear_choices()
    x = torch.randn(5, 16, requires_grad=True)
    a = torch.randn(4, 16, requires_grad=True)
    y = ops.lora_linear(x, torch.randn(8, 16), None, a, torch.randn(8, 4), 2.0, 0.1, training=True)
    y.sum().backward()
    assert calls == [2] and x.grad is not None and a.grad is not None
