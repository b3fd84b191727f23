"""Triton QLoRA kernels (``backends/triton/lora_4bit.py``: F2q, the M <= 16 GEMV F2v, B2q) against the reference.

- Interpreter (``TRITON_INTERPRET=1``, a child pytest, as tests/_interpret.py does for the other kernel files): y,
  S, dx, dA, dB within 2x the eager error (eager = the reference in the kernel dtype on the same 4-bit weight;
  truth = the reference's W_deq in fp64/fp32 with activations upcast) on awkward shapes (M ∈ {1, 5, 17, 40}, K and
  N not multiples of 16 or of the blocksize, r ∈ {1, 8, 17}), nf4/fp4, nested or not, blocksize 64/128, uint8 and
  bf16 storage, fp16/bf16/fp32 compute, dropout, biases; ops.lora_linear_4bit autograd with backend="triton".
- Ahead of time: every kernel × config for sm_80 and sm_90 (tests/kernels/test_triton_aot.py, the QLoRA block).
Weights come from bitsandbytes' quantize_4bit on CPU.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from _interpret import run_interpreter_suite
from _tolerances import assert_close_to_ref, truth_dtype

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    M: int
    K: int
    N: int
    r: int
    dtype: torch.dtype
    quant_type: str = "nf4"
    nested: bool = True
    blocksize: int = 64
    storage: torch.dtype = torch.uint8
    p: float = 0.0
    bias: bool = True
    lora_bias: bool = False
    a_dtype: torch.dtype | None = None

    def __str__(self):
        return self.name


CASES = (
    Case("gemv-m1-k70-n33-r8-bf16", 1, 70, 33, 8, torch.bfloat16),
    Case("gemv-m5-k96-n130-r17-fp16-fp4-flat-p0.1", 5, 96, 130, 17, torch.float16, "fp4", False, p=0.1),
    Case("m17-k130-n40-r1-fp32-b128-bf16storage", 17, 130, 40, 1, torch.float32, blocksize=128,
         storage=torch.bfloat16),
    Case("m40-k33-n96-r8-fp16-p0.1-lorabias-fp32adapters", 40, 33, 96, 8, torch.float16, p=0.1, lora_bias=True,
         a_dtype=torch.float32),
    Case("m17-k96-n70-r16-bf16-fp4-b128-nobias", 17, 96, 70, 16, torch.bfloat16, "fp4", True, 128, bias=False),
)  # fmt: skip


def make_inputs(case: Case, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    a_dtype = case.a_dtype or case.dtype
    weight = torch.randn(case.N, case.K, generator=gen) / case.K**0.5
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=case.blocksize, compress_statistics=case.nested,
                                                 quant_type=case.quant_type, quant_storage=case.storage)  # fmt: skip
    from peft_kernels.ops import quant_operands

    return {
        "x": torch.randn(case.M, case.K, generator=gen).to(case.dtype),
        "quant": quant_operands(packed, state),
        "bias": (torch.randn(case.N, generator=gen) * 0.1).to(case.dtype) if case.bias else None,
        "a": (torch.randn(case.r, case.K, generator=gen) / case.K**0.5).to(a_dtype),
        "b": (torch.randn(case.N, case.r, generator=gen) * 0.1).to(a_dtype),
        "bb": (torch.randn(case.N, generator=gen) * 0.1).to(a_dtype) if case.lora_bias else None,
        "dy": torch.randn(case.M, case.N, generator=gen).to(case.dtype),
        "seeds": torch.tensor([0x5EED_1234], dtype=torch.int64) if case.p > 0 else None,
    }


def run(mod, inp, x_dtype=None, a_dtype=None, quant=None) -> dict:
    """(y, S, dx, dA, dB) of ``mod``'s lora_linear_4bit_{fwd,bwd}, activations / adapters cast as given."""
    x_dtype = x_dtype or inp["x"].dtype
    a_dtype = a_dtype or inp["a"].dtype
    quant = quant if quant is not None else inp["quant"]
    x, dy = inp["x"].to(x_dtype), inp["dy"].to(x_dtype)
    bias = inp["bias"].to(x_dtype) if inp["bias"] is not None else None
    a, b = inp["a"].to(a_dtype), inp["b"].to(a_dtype)
    bb = inp["bb"].to(a_dtype) if inp["bb"] is not None else None
    p = 0.1 if inp["seeds"] is not None else 0.0
    y, (s, *kept) = mod.lora_linear_4bit_fwd(x, *quant, bias, [a], [b], [bb], [1.5], [p], inp["seeds"])  # CPU mask
    dx, (d_a,), (d_b,) = mod.lora_linear_4bit_bwd(
        dy, x, *quant, [a], [b], [s, *kept], [1.5], [p], inp["seeds"], [True, True]
    )
    return {"y": y, "S": s, "dx": dx, "dA": d_a, "dB": d_b}


def _truth(inp, w_deq, acc, case):
    """The reference's LoRA half in acc on a dense W (lora.py's reference with the base product upcast)."""
    from peft_kernels.backends.reference import lora as ref16

    x, dy = inp["x"].to(acc), inp["dy"].to(acc)
    bias = inp["bias"].to(acc) if inp["bias"] is not None else None
    a, b = inp["a"].to(acc), inp["b"].to(acc)
    bb = inp["bb"].to(acc) if inp["bb"] is not None else None
    p = 0.1 if inp["seeds"] is not None else 0.0
    y, (s, *kept) = ref16.lora_linear_fwd(x, w_deq, bias, [a], [b], [bb], [1.5], [p], inp["seeds"])  # kept: CPU mask
    dx, (d_a,), (d_b,) = ref16.lora_linear_bwd(
        dy, x, w_deq, [a], [b], [s, *kept], [1.5], [p], inp["seeds"], [True, True]
    )
    return {"y": y, "S": s, "dx": dx, "dA": d_a, "dB": d_b}


if not INTERPRETING:

    @pytest.mark.interpret
    def test_interpreter_suite():
        """Runs this file's interpreter checks in a child pytest with TRITON_INTERPRET=1 set before import."""
        pytest.importorskip("triton")
        run_interpreter_suite(__file__, timeout=900, PEFT_KERNELS_CPU_DROPOUT="philox")

    # On a GPU: the headline shapes of issue #14 (bf16, fp32 adapters, dropout) and the decode GEMV, plus the awkward
    # interpreter cases, against the reference on the same device.
    GPU_CASES = (
        Case("llama-q-4096-r16-bf16-fp32adapters-p0.1", 4096, 4096, 4096, 16, torch.bfloat16, p=0.1,
             a_dtype=torch.float32),
        Case("decode-1x4096x4096-r16-bf16", 1, 4096, 4096, 16, torch.bfloat16),
        *CASES,
    )  # fmt: skip

    @pytest.mark.gpu
    @pytest.mark.parametrize("case", GPU_CASES, ids=str)
    def test_gpu_kernels_match_reference_cuda(case):
        from peft_kernels.backends.reference import lora_4bit as ref4
        from peft_kernels.backends.triton import lora_4bit as tri4

        inp = make_inputs(case)
        inp = {k: _to_cuda(v) for k, v in inp.items()}
        out, eager = run(tri4, inp), run(ref4, inp)
        acc = truth_dtype(case.dtype)
        truth = _truth(inp, ref4.dequantize_4bit(*inp["quant"], dtype=case.dtype).to(acc), acc, case)
        for name in ("y", "S", "dx", "dA", "dB"):
            dtype = case.dtype if name in ("y", "dx") else (case.a_dtype or case.dtype)
            assert out[name].dtype == eager[name].dtype, name
            assert_close_to_ref(out[name], eager[name], truth[name], dtype, f"{case}: {name}")

    def _to_cuda(value):
        if isinstance(value, torch.Tensor):
            return value.cuda()
        if isinstance(value, tuple):  # the Quant4bit operands
            return type(value)(*(_to_cuda(v) for v in value))
        return value

    def test_cpu_tensors_need_the_interpreter():
        """Without TRITON_INTERPRET the Triton 4-bit ops decline CPU tensors with a reason naming the device."""
        from peft_kernels.ops import _dispatch

        inp = make_inputs(CASES[0])
        args = (inp["x"], *inp["quant"], None, [inp["a"]], [inp["b"]], [None], [1.0], [0.0], None)
        reasons = _dispatch.call_reasons("triton", "lora_linear_4bit_fwd", *args)
        assert reasons and any("cpu" in r or "triton" in r.lower() for r in reasons), reasons

else:
    triton = pytest.importorskip("triton")
    from peft_kernels import ops
    from peft_kernels.backends.reference import lora_4bit as ref4
    from peft_kernels.backends.reference.dropout import philox_on_cpu
    from peft_kernels.backends.triton import lora_4bit as tri4

    pytestmark = pytest.mark.interpret

    @pytest.fixture(autouse=True)
    def _philox_reference_masks():
        with philox_on_cpu():
            yield

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_kernels_match_reference(case):
        inp = make_inputs(case)
        out = run(tri4, inp)
        eager = run(ref4, inp)
        acc = truth_dtype(case.dtype)
        # Truth: the reference on the same W_deq bits (decoded in the kernel dtype) with everything else upcast.
        w_deq = ref4.dequantize_4bit(*inp["quant"], dtype=case.dtype).to(acc)
        truth = _truth(inp, w_deq, acc, case)
        for name in ("y", "S", "dx", "dA", "dB"):
            dtype = case.dtype if name in ("y", "dx") else (case.a_dtype or case.dtype)
            assert out[name].dtype == eager[name].dtype, name
            assert_close_to_ref(out[name], eager[name], truth[name], dtype, f"{case}: {name}")

    def test_ops_autograd_with_backend_triton():
        case = CASES[3]
        inp = make_inputs(case)
        leaves = {k: inp[k].clone().requires_grad_() for k in ("x", "a", "b")}
        y = ops.lora_linear_4bit_multi(leaves["x"], inp["quant"], inp["bias"], [leaves["a"]], [leaves["b"]], [None],
                                       [1.5], [0.0], backend="triton")  # fmt: skip
        y.backward(inp["dy"])
        # The autograd plumbing adds nothing: the op's results are the kernels' own, bit for bit.
        expected = run(tri4, {**inp, "seeds": None, "bb": None})
        assert torch.equal(y.detach(), expected["y"])
        for name, key in (("x", "dx"), ("a", "dA"), ("b", "dB")):
            assert torch.equal(leaves[name].grad, expected[key]), name
