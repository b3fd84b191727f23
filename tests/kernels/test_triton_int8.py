"""Triton W8A16 LoRA kernels (``backends/triton/lora_int8.py``: lora.py's F2 and B2 with ``IS_INT8``) three ways.

- Interpreter (``TRITON_INTERPRET=1``, set before triton is imported): the normal run executes this file again in a
  child pytest with the variable set (``test_interpreter_suite``); ``TRITON_INTERPRET=1 pytest <this file>`` runs
  those checks in-process. Against the reference (docs/KERNELS.md §11, int8 row): y, S, dx, dA, dB within 2x the eager
  error (eager = the reference in the kernel dtype, i.e. F.linear on W_deq rounded to that dtype; truth = the
  reference on W_deq in fp32, fp64 for fp32 activations), on M ∈ {1, 3, 17, 64}, K, N ∈ {16, 33, 96, 130},
  r ∈ {1, 8, 16, 17}, fp16 / bf16 (one fp32 case), 16-bit and fp32 adapters, p ∈ {0, 0.1}, bias and b_B on/off,
  strided x, transposed int8 weight; output SQNR against unquantized fp32 weights >= INT8_MIN_SQNR_DB (y and dx);
  S, dx, dA, dB bitwise equal to the 16-bit Triton kernels run on the dequantized weight (same Philox mask, same
  W tile bits in B2); ops.lora_linear_int8 autograd with backend="triton"; capability reasons.
- Ahead of time (no GPU): F2 and B2 with IS_INT8=True for sm_80 and sm_90 at every config the autotuner can pick
  are compiled, spill-checked and shared-memory-checked by test_triton_aot.py (its ``ci_variants``).
- GPU (``@pytest.mark.gpu``): Llama-size M = 4096, K = N = 4096, r = 16 and awkward shapes on CUDA, the same rules.

Weights are quantized by a pure-torch row-wise absmax quantizer (what bitsandbytes' ``int8_vectorwise_quant``
computes: CB = round(127·W/absmax_n), SCB = absmax_n, weight_scale = SCB/127), so these tests need no bitsandbytes.
"""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import torch
from _inputs import LoraCase, make_lora_inputs, upcast
from _interpret import run_interpreter_suite
from _tolerances import INT8_MIN_SQNR_DB, assert_close_to_ref, sqnr_db, truth_dtype

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------------------------
# Inputs shared by the interpreter and the GPU tests
# ---------------------------------------------------------------------------------------------------------------


def quantize_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 (N, K), weight_scale fp32 (N,)): CB = round(127·W/absmax_n), weight_scale = absmax_n·(1/127)."""
    absmax = weight.abs().amax(dim=1).to(torch.float32)
    cb = torch.round(weight.to(torch.float32) * (127.0 / absmax)[:, None]).to(torch.int8)
    return cb, absmax * 7.874015718698502e-3  # bnb_weight_scale(SCB)


def make_int8_inputs(case: LoraCase, device="cpu", seed: int = 0) -> dict:
    """make_lora_inputs plus the unquantized fp32 weight W ~ N(0, 1/K) and its int8 form. case.layout "conv1d"
    stores CB transposed ((K, N) memory, a .t() view), which the kernels read through strides."""
    inp = make_lora_inputs(dataclasses.replace(case, layout="contiguous" if case.layout == "conv1d" else case.layout),
                           device=device, seed=seed)  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    weight = (torch.randn(case.N, case.K, generator=gen, dtype=torch.float64) * case.K**-0.5).to(torch.float32)
    cb, scale = quantize_rowwise(weight)
    if case.layout == "conv1d":
        cb = cb.t().contiguous().t()
    inp.update(weight=weight.to(device), weight_int8=cb.to(device), weight_scale=scale.to(device))
    return inp


def _seeds(p: float, device="cpu", seed: int = 0x5EED_1234_5678):
    return torch.tensor([seed], dtype=torch.int64, device=device) if p > 0 else None


def run_int8(backend_mod, inp, dy, seeds, x_dtype=None, a_dtype=None) -> dict:
    """(y, S, dx, dA, dB) of ``backend_mod``'s lora_linear_int8_{fwd,bwd}, activations / adapters cast to the given
    dtypes (the int8 weight and its fp32 scale never change)."""
    xd = x_dtype or inp["x"].dtype
    ad = a_dtype or inp["lora_a"].dtype
    x, b = upcast(inp["x"], xd), upcast(inp["bias"], xd)
    a, bb, lb = upcast(inp["lora_a"], ad), upcast(inp["lora_b"], ad), upcast(inp["lora_b_bias"], ad)
    cb, ws = inp["weight_int8"], inp["weight_scale"]
    s, p = [inp["scaling"]], [inp["p"]]
    # kept: the reference's dropout mask on CPU tensors (reference.lora.keeps_masks), read by its backward
    y, (shrink, *kept) = backend_mod.lora_linear_int8_fwd(x, cb, ws, b, [a], [bb], [lb], s, p, seeds)
    dx, (d_a,), (d_b,) = backend_mod.lora_linear_int8_bwd(
        upcast(dy, xd), x, cb, ws, [a], [bb], [shrink, *kept], s, p, seeds, [True, True]
    )
    return {"y": y, "S": shrink, "dx": dx, "dA": d_a, "dB": d_b}


def check_against_reference(case: LoraCase, inp, out, dy, seeds) -> None:
    """The 2x rule on every output: eager = reference int8 op in the kernel dtype, truth = it in truth_dtype."""
    from peft_kernels.backends.reference import lora_int8 as ref

    td = truth_dtype(case.dtype)
    eager = run_int8(ref, inp, dy, seeds)
    truth = run_int8(ref, inp, dy, seeds, td, td)
    for name in ("y", "S", "dx", "dA", "dB"):
        assert out[name].dtype == eager[name].dtype, (name, out[name].dtype, eager[name].dtype)
        assert_close_to_ref(out[name], eager[name], truth[name], case.dtype, name=f"{case.name}:{name}")


def check_sqnr(case: LoraCase, inp, out, dy) -> None:
    """y and dx against the fp64 model with the unquantized weight (p = 0 only: same function, no mask)."""
    from peft_kernels.backends.reference import lora as ref_lora

    f64 = torch.float64
    args = [upcast(inp[n], f64) for n in ("x", "weight", "bias")]
    y_t, (s_t,) = ref_lora.lora_linear_fwd(
        *args, [upcast(inp["lora_a"], f64)], [upcast(inp["lora_b"], f64)], [upcast(inp["lora_b_bias"], f64)],
        [inp["scaling"]], [0.0], None,
    )  # fmt: skip
    dx_t, _, _ = ref_lora.lora_linear_bwd(
        dy.to(f64), args[0], args[1], [upcast(inp["lora_a"], f64)], [upcast(inp["lora_b"], f64)], [s_t],
        [inp["scaling"]], [0.0], None, [True, False],
    )  # fmt: skip
    for name, truth in (("y", y_t), ("dx", dx_t)):
        db = sqnr_db(truth, out[name])
        assert db >= INT8_MIN_SQNR_DB, f"{case.name}:{name}: SQNR {db:.1f} dB < {INT8_MIN_SQNR_DB} dB"


def check_same_as_float_kernels(case: LoraCase, device) -> None:
    """S, dA, dB come from the same kernels and dx from B2 with W tiles dequantized to exactly the bits of
    W_deq = (W_int8·scale).to(dtype), so all four equal the 16-bit kernels' run on W_deq bit for bit (the same
    dropout mask included); y differs only in where the scale is applied (fp32 epilogue vs rounded W)."""
    from peft_kernels.backends.reference import lora_int8 as ref
    from peft_kernels.backends.triton import lora as tri
    from peft_kernels.backends.triton import lora_int8 as tri8

    inp = make_int8_inputs(case, device=device)
    seeds = _seeds(case.p, device)
    dy = torch.randn(case.M, case.N, generator=torch.Generator().manual_seed(1)).to(device, case.dtype)
    out8 = run_int8(tri8, inp, dy, seeds)
    w_deq = ref.dequantize_int8(inp["weight_int8"], inp["weight_scale"], case.dtype)
    args = (inp["x"], w_deq, inp["bias"], [inp["lora_a"]], [inp["lora_b"]])
    _, (shrink,) = tri.lora_linear_fwd(*args, [inp["lora_b_bias"]], [inp["scaling"]], [case.p], seeds)
    dx, (d_a,), (d_b,) = tri.lora_linear_bwd(
        dy, inp["x"], w_deq, [inp["lora_a"]], [inp["lora_b"]], [shrink], [inp["scaling"]], [case.p], seeds,
        [True, True],
    )  # fmt: skip
    for name, expected in (("S", shrink), ("dx", dx), ("dA", d_a), ("dB", d_b)):
        assert torch.equal(out8[name], expected), name


if not INTERPRETING:
    # -----------------------------------------------------------------------------------------------------------
    # The interpreter suite, run in a child process
    # -----------------------------------------------------------------------------------------------------------

    @pytest.mark.interpret
    def test_interpreter_suite():
        """Runs this file's interpreter checks in a child pytest with TRITON_INTERPRET=1 set before import."""
        pytest.importorskip("triton")
        run_interpreter_suite(__file__, timeout=900, PEFT_KERNELS_CPU_DROPOUT="philox")

    def test_cpu_tensors_need_the_interpreter():
        """Without TRITON_INTERPRET the Triton int8 ops decline CPU tensors with a reason naming the device."""
        pytest.importorskip("triton")
        from peft_kernels.backends.triton import lora_int8 as tri8

        x, cb, ws = torch.randn(4, 16), torch.zeros(8, 16, dtype=torch.int8), torch.ones(8)
        args = (x, cb, ws, None, [torch.randn(2, 16)], [torch.randn(8, 2)], [None], [1.0], [0.0], None)
        reasons = tri8.not_supported_reasons("lora_linear_int8_fwd", *args)
        assert any("cpu" in r for r in reasons), reasons

    # -----------------------------------------------------------------------------------------------------------
    # sm_90 code shape: the converted W tile feeds wgmma from registers (TTGIR of an AOT compile, no GPU)
    # -----------------------------------------------------------------------------------------------------------

    _SSA_DEF = re.compile(r"^\s*(%[\w#]+)(?::\d+)? = (\S+)")

    @pytest.mark.parametrize("op", ["linear_lora_fwd", "linear_lora_bwd_dx"])
    def test_int8_w_tile_goes_to_wgmma_from_registers_on_sm90(op):
        """wgmma reads its first operand from registers and its second from shared memory. The int8 kernels put the
        converted W tile first (yᵀ = W·xᵀ, dxᵀ = W_deqᵀ·dYᵀ), so no K step writes it back to shared memory: in the
        TTGIR no int8 -> float conversion result reaches a ``ttg.local_alloc`` / ``local_store``, and a
        ``warp_group_dot`` takes a [BLOCK_N, k] register operand (``#ttg.dot_op<{opIdx = 0``)."""
        triton = pytest.importorskip("triton")
        from peft_kernels.backends.triton import _configs, lora

        if not isinstance(lora._linear_lora_fwd_kernel, triton.runtime.JITFunction):
            pytest.skip("kernels are interpreted functions; AOT compile needs the JIT ones")
        import test_triton_aot as aot  # the AOT test's compile helpers (same directory)

        config = _configs._gemm(128, 256, 64, 8, 8, 3)  # the sm_90 large tile
        v = aot._variant(op, 90, "bf16", "fp32", 16, config, op == "linear_lora_bwd_dx", int8=True)
        ttgir = aot.compile_variant(v).asm["ttgir"]
        converted = set()  # SSA values derived from the int8 tile by elementwise conversion
        for line in ttgir.splitlines():
            m = _SSA_DEF.match(line)
            if not m:
                continue
            name, opname = m.groups()
            if opname == "arith.sitofp" or (
                opname in ("arith.mulf", "arith.truncf", "ttg.convert_layout") and any(c in line for c in converted)
            ):
                converted.add(name)
        assert converted, "no arith.sitofp in the TTGIR: the int8 conversion moved, update this test"
        stores = [
            ln.strip()
            for ln in ttgir.splitlines()
            if ("ttg.local_alloc %" in ln or "ttg.local_store %" in ln)
            and re.search(r"ttg\.local_(?:alloc|store) (%[\w#]+)", ln).group(1) in converted
        ]
        assert not stores, "the converted W tile is written to shared memory:\n" + "\n".join(stores[:5])
        register_a = [
            ln for ln in ttgir.splitlines() if "ttng.warp_group_dot" in ln and "tensor<256x" in ln.split("*")[0]
            and "#ttg.dot_op<{opIdx = 0" in ln.split("*")[0]
        ]  # fmt: skip
        assert register_a, "no warp_group_dot takes the [BLOCK_N, k] W tile as a register operand"

    # -----------------------------------------------------------------------------------------------------------
    # GPU
    # -----------------------------------------------------------------------------------------------------------

    # Sized for the GPU suite's shared 240 s pytest budget: each (dtype, M bucket) autotunes and compiles its own
    # kernels, so the list covers each bucket and dtype once or twice rather than the whole grid.
    GPU_INT8_CASES = (
        LoraCase("llama-q-4096x4096x4096-r16-bf16", 4096, 4096, 4096, 16, torch.bfloat16),
        LoraCase("llama-q-4096-r16-bf16-fp32adapters-p0.1", 4096, 4096, 4096, 16, torch.bfloat16, torch.float32,
                 p=0.1, lora_bias=True),
        LoraCase("decode-1x4096x4096-r16-bf16", 1, 4096, 4096, 16, torch.bfloat16),
        LoraCase("decode-16x4096x14336-r8-fp16", 16, 4096, 14336, 8, torch.float16),
        LoraCase("m4097-k123-n431-r17-bf16-p0.1", 4097, 123, 431, 17, torch.bfloat16, p=0.1, lora_bias=True),
        LoraCase("m100-k59-n97-r1-fp32-p0.1", 100, 59, 97, 1, p=0.1),
        LoraCase("m127-k1024-n8-r128-fp16-sliced", 127, 1024, 8, 128, torch.float16, layout="sliced"),
        LoraCase("m7-k1024-n431-r64-bf16-transposed-w", 7, 1024, 431, 64, torch.bfloat16, layout="conv1d"),
    )  # fmt: skip

    def _need(backend):
        from peft_kernels.ops import _dispatch

        if _dispatch.unavailable_reason(backend) is not None:
            pytest.skip(_dispatch.unavailable_reason(backend))

    @pytest.mark.gpu
    @pytest.mark.parametrize("case", GPU_INT8_CASES, ids=str)
    def test_triton_int8_matches_reference_cuda(case):
        _need("triton")
        from peft_kernels.backends.triton import lora_int8 as tri8

        inp = make_int8_inputs(case, device="cuda")
        seeds = _seeds(case.p, "cuda")
        args = (inp["x"], inp["weight_int8"], inp["weight_scale"], inp["bias"], [inp["lora_a"]], [inp["lora_b"]])
        reasons = tri8.not_supported_reasons("lora_linear_int8_fwd", *args, [inp["lora_b_bias"]], [2.0], [case.p],
                                             seeds)  # fmt: skip
        assert not reasons, reasons
        dy = torch.randn(case.M, case.N, device="cuda", dtype=case.dtype)
        out = run_int8(tri8, inp, dy, seeds)
        check_against_reference(case, inp, out, dy, seeds)
        if case.p == 0.0 and case.M >= 16:
            check_sqnr(case, inp, out, dy)

    @pytest.mark.gpu
    @pytest.mark.parametrize("m", [1, 16])
    def test_cuda_int8_decode_matches_reference_cuda(m):
        """The CUDA C++ decode op (first in the int8 forward's priority list) at M <= 16, K = N = 4096, r = 16."""
        _need("cuda")
        from peft_kernels.backends.cuda import lora_int8 as cuda8
        from peft_kernels.backends.reference import lora_int8 as ref

        case = LoraCase(f"cuda-decode-{m}", m, 4096, 4096, 16, torch.bfloat16)
        inp = make_int8_inputs(case, device="cuda")
        args = (inp["x"], inp["weight_int8"], inp["weight_scale"], inp["bias"], [inp["lora_a"]], [inp["lora_b"]],
                [None], [2.0], [0.0], None)  # fmt: skip
        reasons = cuda8.not_supported_reasons("lora_linear_int8_fwd", *args)
        assert not reasons, reasons
        y, _ = cuda8.lora_linear_int8_fwd(*args)
        f32 = torch.float32
        y_e, _ = ref.lora_linear_int8_fwd(*args)
        truth_args = (upcast(inp["x"], f32), *args[1:3], upcast(inp["bias"], f32), [upcast(inp["lora_a"], f32)],
                      [upcast(inp["lora_b"], f32)], *args[6:])  # fmt: skip
        y_t, _ = ref.lora_linear_int8_fwd(*truth_args)
        assert_close_to_ref(y, y_e, y_t, case.dtype, name=case.name)

    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", [torch.bfloat16])  # fp16: under the interpreter
    def test_same_as_float_kernels_cuda(dtype, monkeypatch):
        """Bitwise as under the interpreter, given one fixed tiling (the autotuner tunes int8 and 16-bit weights
        separately and may pick different tiles) and deterministic mode (fp32 atomics add in any order)."""
        _need("triton")
        import triton

        from peft_kernels.backends.triton import _configs
        from peft_kernels.backends.triton import lora as tri

        config = _configs.DEFAULT_GEMM_CONFIGS["large"][0]
        monkeypatch.setattr(
            tri, "_gemm_launcher",
            lambda op, device, elem_bytes, m: triton.autotune([config], key=tri._AUTOTUNE_KEYS[op])(tri.KERNELS[op]),
        )  # fmt: skip
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            case = LoraCase("bitwise", 1000, 1024, 431, 17, dtype, p=0.1, lora_bias=True)
            check_same_as_float_kernels(case, "cuda")
        finally:
            torch.use_deterministic_algorithms(previous)

else:
    triton = pytest.importorskip("triton")
    from peft_kernels import ops
    from peft_kernels.backends.reference.dropout import philox_on_cpu
    from peft_kernels.backends.triton import lora as tri
    from peft_kernels.backends.triton import lora_int8 as tri8

    pytestmark = pytest.mark.interpret

    @pytest.fixture(autouse=True)
    def _philox_reference_masks():
        """CPU reference masks from the Philox spec (bit-identical to the kernels), not torch's CPU generator."""
        with philox_on_cpu():
            yield

    # Awkward corners of the interpreter grid (every size <= 130; K, N not multiples of 16; M below a tile).
    INT8_CASES = (
        LoraCase("decode-1x130x96-r17-bf16", 1, 130, 96, 17, torch.bfloat16),
        LoraCase("m3-k33-n130-r8-fp16-p0.1", 3, 33, 130, 8, torch.float16, p=0.1),
        LoraCase("m17-k130-n33-r17-bf16-p0.1-lorabias", 17, 130, 33, 17, torch.bfloat16, p=0.1, lora_bias=True),
        LoraCase("m64-k96-n96-r16-bf16-fp32adapters", 64, 96, 96, 16, torch.bfloat16, torch.float32),
        LoraCase("m17-k33-n96-r1-fp16-fp32adapters-p0.1-nobias", 17, 33, 96, 1, torch.float16, torch.float32, p=0.1,
                 bias=False),
        LoraCase("m64-k130-n16-r8-fp16-sliced", 64, 130, 16, 8, torch.float16, layout="sliced"),
        LoraCase("m17-k96-n130-r16-bf16-transposed-w-p0.1", 17, 96, 130, 16, torch.bfloat16, p=0.1, layout="conv1d"),
        LoraCase("m64-k16-n33-r17-fp16", 64, 16, 33, 17, torch.float16, lora_bias=True),
        LoraCase("m17-k33-n130-r8-fp32-p0.1", 17, 33, 130, 8, torch.float32, p=0.1),
    )  # fmt: skip

    def _dy(case):
        return torch.randn(case.M, case.N, generator=torch.Generator().manual_seed(1)).to(case.dtype)

    @pytest.mark.parametrize("case", INT8_CASES, ids=str)
    def test_backend_matches_reference(case):
        inp = make_int8_inputs(case)
        seeds = _seeds(case.p)
        dy = _dy(case)
        out = run_int8(tri8, inp, dy, seeds)
        assert out["y"].shape == (case.M, case.N) and out["dx"].shape == (case.M, case.K)
        assert out["dx"].dtype == case.dtype and out["dA"].dtype == case.a_dtype and out["dB"].dtype == case.a_dtype
        check_against_reference(case, inp, out, dy, seeds)
        if case.p == 0.0 and case.M >= 16:
            check_sqnr(case, inp, out, dy)

    # fp16 only: triton 3.9's interpreter rounds fp32 -> bf16 toward zero (cast_impl ignores the rounding mode;
    # the GPU rounds to nearest even like torch), so a bf16 W tile dequantized under the interpreter is not the
    # reference's W_deq; the bf16 variant of this check runs on the GPU (test_same_as_float_kernels_cuda).
    @pytest.mark.parametrize("case", [INT8_CASES[1], INT8_CASES[4]], ids=str)
    def test_same_as_float_kernels_on_dequantized_weight(case):
        check_same_as_float_kernels(case, "cpu")

    def test_output_mask_skips_what_is_not_needed():
        case = LoraCase("mask", 17, 33, 40, 8, torch.bfloat16, p=0.1)
        inp = make_int8_inputs(case)
        seeds = _seeds(case.p)
        w8 = (inp["weight_int8"], inp["weight_scale"])
        y, (shrink,) = tri8.lora_linear_int8_fwd(inp["x"], *w8, None, [inp["lora_a"]], [inp["lora_b"]], [None],
                                                 [2.0], [0.1], seeds)  # fmt: skip
        common = (torch.randn_like(y), inp["x"], *w8, [inp["lora_a"]], [inp["lora_b"]], [shrink], [2.0], [0.1], seeds)
        dx, d_a, d_b = tri8.lora_linear_int8_bwd(*common, [False, True])
        assert dx is None and len(d_a) == 1 and len(d_b) == 1
        dx, d_a, d_b = tri8.lora_linear_int8_bwd(*common, [True, False])
        assert dx is not None and d_a == [] and d_b == []
        assert tri8.lora_linear_int8_bwd(*common, [False, False]) == (None, [], [])

    def test_ops_lora_linear_int8_autograd(monkeypatch):
        """ops.lora_linear_int8(backend="triton") on 3-D x with dropout and b_B: one Triton forward and one Triton
        backward (the Function re-enters the forced backend), y and every gradient within the 2x rule."""
        calls = {"fwd": 0, "bwd": 0}
        # The int8 weight runs on the one LoRA op's Triton functions (lora.py), weight_scale given.
        real_fwd, real_bwd = tri.lora_linear_fwd, tri.lora_linear_bwd

        def counting(kind, real):
            def call(*args):
                calls[kind] += 1
                return real(*args)

            return call

        monkeypatch.setattr(tri, "lora_linear_fwd", counting("fwd", real_fwd))
        monkeypatch.setattr(tri, "lora_linear_bwd", counting("bwd", real_bwd))
        case = LoraCase("ops-3d", 2 * 9, 33, 40, 8, torch.bfloat16, p=0.1, lora_bias=True)
        inp = make_int8_inputs(case)
        g = torch.randn(2, 9, case.N, generator=torch.Generator().manual_seed(4))

        def run(backend, dtype):
            leaves = {
                n: upcast(inp[n], dtype).requires_grad_() for n in ("x", "bias", "lora_a", "lora_b", "lora_b_bias")
            }
            torch.manual_seed(11)  # the op draws its dropout seed from torch's generator
            y = ops.lora_linear_int8(
                leaves["x"].view(2, 9, case.K), inp["weight_int8"], inp["weight_scale"], leaves["bias"],
                leaves["lora_a"], leaves["lora_b"], 2.0, 0.1, training=True, backend=backend,
                lora_b_bias=leaves["lora_b_bias"],
            )  # fmt: skip
            y.backward(g.to(dtype))
            return y.detach(), {n: t.grad for n, t in leaves.items()}

        y_k, g_k = run("triton", case.dtype)
        assert calls == {"fwd": 1, "bwd": 1}, calls
        y_e, g_e = run("reference", case.dtype)
        y_t, g_t = run("reference", torch.float32)
        assert y_k.shape == (2, 9, case.N) and y_k.dtype == case.dtype
        assert_close_to_ref(y_k, y_e, y_t, case.dtype, name="y")
        for name in g_k:
            assert g_k[name].dtype == case.dtype, name
            assert_close_to_ref(g_k[name], g_e[name], g_t[name], case.dtype, name=f"d{name}")

    def _fwd_args(**overrides):
        args = dict(
            x=torch.randn(4, 16),
            weight_int8=torch.zeros(8, 16, dtype=torch.int8),
            weight_scale=torch.ones(8),
            bias=None,
            lora_a=[torch.randn(2, 16)],
            lora_b=[torch.randn(8, 2)],
            lora_b_bias=[None],
            scaling=[1.0],
            dropout_p=[0.0],
            seeds=None,
        )
        args.update(overrides)
        return list(args.values())

    @pytest.mark.parametrize(
        "overrides, needle",
        [
            ({"weight_int8": torch.zeros(8, 16)}, "weight_int8.dtype=torch.float32"),
            ({"weight_scale": torch.ones(8, dtype=torch.float16)}, "weight_scale is torch.float16"),
            ({"weight_scale": torch.ones(7)}, "(7,)"),
            ({"x": torch.randn(4, 16, dtype=torch.float64)}, "x.dtype=torch.float64"),
            ({"bias": torch.randn(8, dtype=torch.float16)}, "bias.dtype"),
            ({"lora_a": [torch.randn(2, 16)] * 2, "lora_b": [torch.randn(8, 2)] * 2}, "2 active adapters"),
            ({"lora_a": [torch.randn(300, 16)], "lora_b": [torch.randn(8, 300)]}, "r=300"),
            ({"dropout_p": [0.5]}, "seeds"),
            ({"x": torch.randn(0, 16)}, "M=0"),
        ],
    )  # fmt: skip
    def test_not_supported_reasons_name_the_bad_value(overrides, needle):
        reasons = tri8.not_supported_reasons("lora_linear_int8_fwd", *_fwd_args(**overrides))
        assert any(needle in r for r in reasons), reasons
        assert tri8.not_supported_reasons("lora_linear_int8_fwd", *_fwd_args()) == []
        assert tri8.not_supported_reasons("lora_linear_fwd", *_fwd_args()) == ["no Triton kernel for lora_linear_fwd"]

    def test_forced_triton_raises_with_reasons_and_auto_falls_back():
        x = torch.randn(3, 16, dtype=torch.float64)
        cb, ws = torch.ones(8, 16, dtype=torch.int8), torch.full((8,), 0.5)
        a, b = torch.randn(2, 16, dtype=torch.float64), torch.zeros(8, 2, dtype=torch.float64)
        with pytest.raises(NotImplementedError, match="float64"):
            ops.lora_linear_int8(x, cb, ws, None, a, b, 1.0, backend="triton")
        y = ops.lora_linear_int8(x, cb, ws, None, a, b, 1.0)  # automatic choice on CPU: the reference
        assert torch.equal(y, x @ torch.full((8, 16), 0.5, dtype=torch.float64).t())
