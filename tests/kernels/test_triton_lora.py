"""Triton LoRA kernels executed by Triton's interpreter (TRITON_INTERPRET=1, numpy on CPU) against the reference.

``TRITON_INTERPRET`` must be set before the kernels are decorated (import time), so a normal test run executes this
file again in a child ``pytest`` with the variable set (``test_interpreter_suite``); run directly as
``TRITON_INTERPRET=1 pytest tests/kernels/test_triton_lora.py`` the checks run in-process.

Checked (docs/KERNELS.md §11): forward y and S and the gradients of x, A, B (and b_B through ops.lora_linear) against the
fp64 / fp32 reference with the 2x-eager rule of tests/_tolerances.py, over a sample of the grid M ∈ {1, 3, 17, 64},
K, N ∈ {16, 33, 96, 130}, r ∈ {1, 8, 16, 17}, fp32 / fp16 / bf16 (and fp32 adapters on 16-bit activations),
p ∈ {0, 0.1}, bias on/off, strided / transposed x, Conv1D-layout W, 3-D x; the split (atomic) and deterministic
(workspace) reductions; the dropout mask: identical to the pure-torch Philox, the same in forward and backward,
independent of tiling, int64 offsets past 2**32, keep rate within 4σ, bitwise reproducible per seed.
"""

from __future__ import annotations

import os

import pytest
import torch
from _interpret import run_interpreter_suite

pytestmark = pytest.mark.interpret

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


if not INTERPRETING:

    def test_interpreter_suite():
        """Runs this file's checks in a child pytest with TRITON_INTERPRET=1 set before triton is imported."""
        pytest.importorskip("triton")
        # The reference draws CPU dropout masks from torch's generator unless told to use the Philox spec.
        run_interpreter_suite(__file__, timeout=900, PEFT_KERNELS_CPU_DROPOUT="philox")

    def test_cpu_tensors_need_the_interpreter():
        """Without TRITON_INTERPRET the Triton backend declines CPU tensors with a reason naming the device."""
        pytest.importorskip("triton")
        from peft_kernels.backends.triton import lora as tri

        x, w = torch.randn(4, 16), torch.randn(8, 16)
        a, b = torch.randn(2, 16), torch.randn(8, 2)
        reasons = tri.not_supported_reasons("lora_linear_fwd", x, w, None, [a], [b], [None], [1.0], [0.0], None)
        assert any("cpu" in r for r in reasons), reasons

else:
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from _inputs import INTERPRET_CASES, LoraCase, make_lora_inputs, upcast
    from _tolerances import EXACT, assert_close, assert_close_to_ref, truth_dtype

    from peft_kernels import ops
    from peft_kernels.backends.reference import lora as ref
    from peft_kernels.backends.reference.dropout import lora_dropout_mask as ref_mask
    from peft_kernels.backends.reference.dropout import philox_on_cpu, philox_uniform4
    from peft_kernels.backends.triton import _configs
    from peft_kernels.backends.triton import lora as tri
    from peft_kernels.backends.triton.dropout import _philox4x32_10, dropout_bits, keep_threshold
    from peft_kernels.backends.triton.dropout import lora_dropout_mask as tri_mask
    from peft_kernels.ops import _dispatch

    SEED = 0x5EED_1234_5678

    @pytest.fixture(autouse=True)
    def _philox_reference_masks():
        """CPU reference masks from the Philox spec (bit-identical to the kernels), not torch's CPU generator."""
        with philox_on_cpu():
            yield

    def _seeds(p: float, seed: int = SEED):
        return torch.tensor([seed], dtype=torch.int64) if p > 0 else None

    def _run(backend_mod, inp, dy, seeds, x_dtype=None, a_dtype=None):
        """(y, S, dx, dA, dB) of ``backend_mod`` with the inputs cast to (x_dtype, a_dtype) when given."""
        xd = x_dtype or inp["x"].dtype
        ad = a_dtype or inp["lora_a"].dtype
        x, w, b = upcast(inp["x"], xd), upcast(inp["weight"], xd), upcast(inp["bias"], xd)
        a, bb, lb = upcast(inp["lora_a"], ad), upcast(inp["lora_b"], ad), upcast(inp["lora_b_bias"], ad)
        s, p = [inp["scaling"]], [inp["p"]]
        # kept: the reference's dropout mask on CPU tensors (reference.lora.keeps_masks), read by its backward
        y, (shrink, *kept) = backend_mod.lora_linear_fwd(x, w, b, [a], [bb], [lb], s, p, seeds)
        dx, (d_a,), (d_b,) = backend_mod.lora_linear_bwd(
            upcast(dy, xd), x, w, [a], [bb], [shrink, *kept], s, p, seeds, [True, True]
        )
        return {"y": y, "S": shrink, "dx": dx, "dA": d_a, "dB": d_b}

    def _check_against_reference(case: LoraCase, inp, out, dy, seeds):
        td = truth_dtype(case.dtype)
        eager = _run(ref, inp, dy, seeds)
        truth = _run(ref, inp, dy, seeds, td, td)
        for name in ("y", "S", "dx", "dA", "dB"):
            assert out[name].dtype == eager[name].dtype, (name, out[name].dtype, eager[name].dtype)
            assert_close_to_ref(out[name], eager[name], truth[name], case.dtype, name=f"{case.name}:{name}")

    # ------------------------------------------------------------------------------------------------------
    # Backend functions against the reference
    # ------------------------------------------------------------------------------------------------------

    @pytest.mark.parametrize("case", INTERPRET_CASES, ids=str)
    def test_backend_matches_reference(case):
        inp = make_lora_inputs(case)
        seeds = _seeds(case.p)
        dy = torch.randn(case.M, case.N, generator=torch.Generator().manual_seed(1)).to(case.dtype)
        out = _run(tri, inp, dy, seeds)
        assert out["y"].shape == (case.M, case.N) and out["dx"].shape == (case.M, case.K)
        assert out["dx"].dtype == case.dtype and out["dA"].dtype == case.a_dtype and out["dB"].dtype == case.a_dtype
        _check_against_reference(case, inp, out, dy, seeds)

    def test_output_mask_skips_what_is_not_needed():
        case = LoraCase("mask", 17, 33, 40, 8, torch.bfloat16, p=0.1)
        inp = make_lora_inputs(case)
        seeds = _seeds(case.p)
        args = (inp["x"], inp["weight"], inp["bias"], [inp["lora_a"]], [inp["lora_b"]], [None])
        y, (shrink,) = tri.lora_linear_fwd(*args, [2.0], [0.1], seeds)
        dy = torch.randn_like(y)
        common = (dy, inp["x"], inp["weight"], [inp["lora_a"]], [inp["lora_b"]], [shrink], [2.0], [0.1], seeds)
        dx, d_a, d_b = tri.lora_linear_bwd(*common, [False, True])
        assert dx is None and len(d_a) == 1 and len(d_b) == 1
        dx, d_a, d_b = tri.lora_linear_bwd(*common, [True, False])
        assert dx is not None and d_a == [] and d_b == []
        assert tri.lora_linear_bwd(*common, [False, False]) == (None, [], [])

    def test_deterministic_mode_uses_workspaces_and_is_reproducible():
        # M=17, N=K=96 with the interpreter's 2 "SMs": every reduction is split (F1 over K, B1 over N and over
        # M blocks, B3 over M), so both the atomic and the workspace paths run.
        case = LoraCase("det", 17, 96, 96, 17, torch.float32, p=0.1)
        inp = make_lora_inputs(case)
        seeds = _seeds(case.p)
        dy = torch.randn(case.M, case.N, generator=torch.Generator().manual_seed(2))
        atomic = _run(tri, inp, dy, seeds)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            det1 = _run(tri, inp, dy, seeds)
            det2 = _run(tri, inp, dy, seeds)
        finally:
            torch.use_deterministic_algorithms(previous)
        for name in det1:
            assert torch.equal(det1[name], det2[name]), name
        _check_against_reference(case, inp, det1, dy, seeds)
        _check_against_reference(case, inp, atomic, dy, seeds)

    def test_same_seed_is_bitwise_reproducible_and_seeds_matter():
        case = LoraCase("seed", 17, 33, 40, 8, torch.float16, p=0.1)
        inp = make_lora_inputs(case)
        dy = torch.randn(case.M, case.N, generator=torch.Generator().manual_seed(3)).to(case.dtype)
        first = _run(tri, inp, dy, _seeds(case.p, 7))
        again = _run(tri, inp, dy, _seeds(case.p, 7))
        other = _run(tri, inp, dy, _seeds(case.p, 8))
        for name in first:
            assert torch.equal(first[name], again[name]), name
        assert not torch.equal(first["S"], other["S"])

    # ------------------------------------------------------------------------------------------------------
    # Through the registered ops and the autograd Function (3-D and strided x, lora_bias, None gradients)
    # ------------------------------------------------------------------------------------------------------

    _OPS_CASES = (
        # (name, lead shape, K, N, r, dtype, adapter dtype, p, strided x, x requires grad)
        ("3d-bf16-p0.1-lorabias", (2, 9), 33, 40, 8, torch.bfloat16, torch.bfloat16, 0.1, False, True),
        ("3d-strided-fp32", (3, 5), 33, 17, 17, torch.float32, torch.float32, 0.0, True, True),
        ("2d-fp16-fp32adapters-p0.1-no-dx", (7,), 16, 96, 1, torch.float16, torch.float32, 0.1, False, False),
    )

    def _ops_call(backend, x, w, b, a, bb, lb, p, seed):
        torch.manual_seed(seed)  # the op draws its dropout seed from torch's generator
        return ops.lora_linear(x, w, b, a, bb, 2.0, p, training=True, backend=backend, lora_b_bias=lb)

    def _ops_grads(backend, tensors, dtypes, p, g, x_grad, strided):
        """(y, grads) of ops.lora_linear on leaves cast to dtypes = (activation dtype, adapter dtype)."""
        xd, ad = dtypes

        def leaf(name, dtype, grad):
            t = tensors[name]
            return None if t is None else t.detach().to(dtype).requires_grad_(grad)

        x_base = leaf("x", xd, x_grad)  # (*lead, 2K) when strided: x is every other column of it, a view
        x = x_base[..., ::2] if strided else x_base
        w, bias = leaf("w", xd, False), leaf("bias", xd, True)
        a, b, lb = leaf("a", ad, True), leaf("b", ad, True), leaf("lb", ad, True)
        y = _ops_call(backend, x, w, bias, a, b, lb, p, 11)
        if backend == "triton":
            # ops.lora_linear scopes backend= to the forward call; the CPU backward op would otherwise run the
            # reference, so the backward is forced here too (CUDA dispatch picks Triton by priority).
            with _dispatch.force_backend("triton"):
                y.backward(g.to(y.dtype))
        else:
            y.backward(g.to(y.dtype))
        dx = x_base.grad
        if dx is not None and strided:
            dx = dx[..., ::2]
        grads = {"x": dx, "a": a.grad, "b": b.grad, "lb": None if lb is None else lb.grad, "bias": bias.grad}
        return y.detach(), grads

    @pytest.mark.parametrize("spec", _OPS_CASES, ids=lambda s: s[0])
    def test_ops_lora_linear_autograd(spec, monkeypatch):
        name, lead, K, N, r, dtype, a_dtype, p, strided, x_grad = spec
        calls = {"fwd": 0, "bwd": 0}
        real_fwd, real_bwd = tri.lora_linear_fwd, tri.lora_linear_bwd

        def counting_fwd(*args):
            calls["fwd"] += 1
            return real_fwd(*args)

        def counting_bwd(*args):
            calls["bwd"] += 1
            return real_bwd(*args)

        monkeypatch.setattr(tri, "lora_linear_fwd", counting_fwd)
        monkeypatch.setattr(tri, "lora_linear_bwd", counting_bwd)
        gen = torch.Generator().manual_seed(5)
        tensors = {
            "x": torch.randn(*lead, 2 * K if strided else K, generator=gen, dtype=torch.float64),
            "w": torch.randn(N, K, generator=gen, dtype=torch.float64) / K**0.5,
            "bias": torch.randn(N, generator=gen, dtype=torch.float64),
            "a": torch.randn(r, K, generator=gen, dtype=torch.float64) / K**0.5,
            "b": torch.randn(N, r, generator=gen, dtype=torch.float64) / 2,
            "lb": torch.randn(N, generator=gen, dtype=torch.float64) / 2 if "lorabias" in name else None,
        }
        g = torch.randn(*lead, N, generator=gen, dtype=torch.float64)
        td = truth_dtype(dtype)
        y_k, g_k = _ops_grads("triton", tensors, (dtype, a_dtype), p, g, x_grad, strided)
        assert calls == {"fwd": 1, "bwd": 1}, calls
        y_e, g_e = _ops_grads("reference", tensors, (dtype, a_dtype), p, g, x_grad, strided)
        y_t, g_t = _ops_grads("reference", tensors, (td, td), p, g, x_grad, strided)
        assert y_k.shape == (*lead, N) and y_k.dtype == dtype
        assert_close_to_ref(y_k, y_e, y_t, dtype, name=f"{name}:y")
        for key in ("x", "a", "b", "lb"):
            if g_t[key] is None:
                assert g_k[key] is None, key
                continue
            assert g_k[key].dtype == g_e[key].dtype, key
            assert_close_to_ref(g_k[key], g_e[key], g_t[key], dtype, name=f"{name}:d{key}")
        assert (g_k["x"] is None) == (not x_grad)

    @pytest.mark.parametrize("lead, strided, dtype", [((2, 9), False, torch.bfloat16), ((3, 5), True, torch.float32)])
    def test_inference_form_runs_the_triton_forward(lead, strided, dtype, monkeypatch):
        """A no-grad one-adapter call takes lora_linear_inference; Triton has no kernel of its own for it, so the
        dispatcher runs tri.lora_linear_fwd on the flattened call (_dispatch.DERIVED) and reshapes y back."""
        calls = []
        real_fwd = tri.lora_linear_fwd
        monkeypatch.setattr(tri, "lora_linear_fwd", lambda *args: calls.append(args[0].shape) or real_fwd(*args))
        K, N, r = 33, 40, 8
        gen = torch.Generator().manual_seed(6)
        x64 = torch.randn(*lead, 2 * K if strided else K, generator=gen, dtype=torch.float64)
        w64 = torch.randn(N, K, generator=gen, dtype=torch.float64) / K**0.5
        b64 = torch.randn(N, generator=gen, dtype=torch.float64)
        a64 = torch.randn(r, K, generator=gen, dtype=torch.float64) / K**0.5
        bb64 = torch.randn(N, r, generator=gen, dtype=torch.float64) / 2

        def call(backend, dt):
            x = x64.to(dt)[..., ::2] if strided else x64.to(dt)
            with torch.no_grad():
                return ops.lora_linear(x, w64.to(dt), b64.to(dt), a64.to(dt), bb64.to(dt), 2.0, 0.1, backend=backend)

        y_k = call("triton", dtype)
        assert calls == [(lead[0] * lead[1], K)], calls
        assert y_k.shape == (*lead, N) and y_k.dtype == dtype
        assert_close_to_ref(y_k, call("reference", dtype), call("reference", truth_dtype(dtype)), dtype, "y")

    # ------------------------------------------------------------------------------------------------------
    # Dropout mask
    # ------------------------------------------------------------------------------------------------------

    @pytest.mark.parametrize("seed", [0, 2**40 + 3, -5])
    @pytest.mark.parametrize("p", [0.1, 0.5, 1 / 3, 0.999])
    def test_mask_kernel_matches_reference_for_two_tilings(seed, p):
        rows, cols = 37, 130
        t_seed = torch.tensor([seed], dtype=torch.int64)
        expected = ref_mask(t_seed[0], rows, cols, p)
        assert torch.equal(tri_mask(t_seed, rows, cols, p, block_m=16, block_w=1), expected)
        assert torch.equal(tri_mask(t_seed, rows, cols, p, block_m=64, block_w=4), expected)

    @pytest.mark.parametrize("p", [1e-7, 0.1, 1 / 3, 0.5, 0.999, 0.9999999])
    def test_keep_threshold_is_the_last_rejected_value(p):
        """uniform(v) = fl(fl(v)·scale) < p for v = T and >= p for v = T + 1, in fp32 (the spec's comparison)."""
        t = keep_threshold(p)
        scale, p32 = torch.tensor(4.6566127342e-10), torch.tensor(p, dtype=torch.float32)
        below, above = (torch.tensor(float(v), dtype=torch.float32) * scale for v in (t, t + 1))
        assert 0 <= t < 2**31 - 1 and bool(below < p32) and bool(above >= p32)

    @pytest.mark.parametrize("rows, cols", [(5, 130), (17, 33), (3, 64), (1, 31)])
    def test_packed_bits_layout(rows, cols):
        """The mask kernel's words against the reference mask packed here in Python: int32 [M, ceil(K/32)], column
        32g + 2q + h at bit q + 16h of word g, bits past K zero; the words of two tilings agree."""
        seed, p = torch.tensor([-(2**35) + 17], dtype=torch.int64), 0.3
        keep = ref_mask(seed[0], rows, cols, p).tolist()
        n_words = (cols + 31) // 32
        expected = torch.zeros(rows, n_words, dtype=torch.int64)
        for m in range(rows):
            for k in range(cols):
                if keep[m][k]:
                    j = k % 32
                    expected[m, k // 32] += 1 << (j // 2 + 16 * (j % 2))
        for block_m, block_w in ((16, 1), (32, 4)):
            bits = dropout_bits(seed, rows, cols, p, block_m, block_w)
            assert bits.dtype == torch.int32 and bits.shape == (rows, n_words)
            assert torch.equal(bits.to(torch.int64) & 0xFFFFFFFF, expected)

    def test_keep_rate_within_4_sigma():
        rows, cols, p = 256, 256, 0.1
        keep = tri_mask(torch.tensor([SEED], dtype=torch.int64), rows, cols, p, block_m=64, block_w=4)
        n = rows * cols
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(keep.double().mean().item() - (1 - p)) <= 4 * sigma

    @triton.jit
    def _philox_at_rows_kernel(seed_ptr, out_ptr, row0, K, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
        """out[i, g, c] = word c of the Philox call of row row0 + i, group g (the mask kernel's offsets)."""
        offs_m = row0 + tl.arange(0, BLOCK_M)
        groups = tl.arange(0, BLOCK_G)
        offsets = offs_m.to(tl.int64)[:, None] * ((K + 3) // 4) + groups.to(tl.int64)[None, :]
        w0, w1, w2, w3 = _philox4x32_10(tl.load(seed_ptr), offsets)
        ptrs = out_ptr + (tl.arange(0, BLOCK_M)[:, None] * BLOCK_G + groups[None, :]) * 4
        tl.store(ptrs + 0, w0.to(tl.int32, bitcast=True))
        tl.store(ptrs + 1, w1.to(tl.int32, bitcast=True))
        tl.store(ptrs + 2, w2.to(tl.int32, bitcast=True))
        tl.store(ptrs + 3, w3.to(tl.int32, bitcast=True))

    @pytest.mark.parametrize("row0, cols", [(2**23, 4096), (2**33 + 5, 3)])
    def test_int64_offsets_past_2_to_the_32(row0, cols):
        """Philox offsets m·ceil(K/4) + k//4 ≥ 2**32 (rows a real launch reaches when M·K > 2**34) keep both counter
        words: the kernel's four words, as uniforms, equal the reference's at those offsets."""
        seed = torch.tensor([SEED], dtype=torch.int64)
        block_m, block_g = 16, 4
        out = torch.empty(block_m, block_g, 4, dtype=torch.int32)
        _philox_at_rows_kernel[(1,)](seed, out, row0, cols, BLOCK_M=block_m, BLOCK_G=block_g)
        rows = torch.arange(block_m, dtype=torch.int64) + row0
        offs = rows[:, None] * ((cols + 3) // 4) + torch.arange(block_g)[None, :]
        assert offs.min().item() >= 2**32
        expected = torch.stack(philox_uniform4(seed[0], offs), dim=-1)  # [rows, groups, 4]
        v = out ^ (out >> 31)  # Triton's uint_to_uniform_float, written independently of the reference
        assert torch.equal(v.to(torch.float32) * torch.tensor(4.6566127342e-10), expected)

    def test_forward_and_backward_see_the_same_mask():
        """A = I and W = 0 expose the masks: S = m ⊙ x/(1-p) in forward, dx = m ⊙ dS/(1-p) in backward."""
        M, K, p = 40, 16, 0.3
        x = torch.randn(M, K)
        w = torch.zeros(24, K)
        a, b = torch.eye(K), torch.randn(24, K)
        seeds = _seeds(p)
        y, (shrink,) = tri.lora_linear_fwd(x, w, None, [a], [b], [None], [1.5], [p], seeds)
        dx, _, _ = tri.lora_linear_bwd(torch.randn(M, 24), x, w, [a], [b], [shrink], [1.5], [p], seeds, [True, False])
        expected = ref_mask(seeds[0], M, K, p)
        assert expected.any() and not expected.all()
        assert torch.equal(shrink != 0, expected)
        assert torch.equal(dx != 0, expected)
        # x·1 summed with exact zeros, then one multiply by 1/(1-p) in fp32: exactly the reference's masked input.
        assert_close(shrink, x * expected * (1.0 / (1.0 - p)), EXACT, name="S")

    def test_kernel_masks_do_not_depend_on_tiling(monkeypatch):
        """The same masked products, bit for bit, under two tilings of F1 (shrink) and B2 (dx): with A = I every
        output element is one masked input times 1 plus exact zeros, so any tiling-dependent mask would show."""
        M, K, N, p = 37, 48, 24, 0.2
        x = torch.randn(M, K)
        w = torch.zeros(N, K)
        a, b = torch.eye(K), torch.randn(N, K)
        seeds = _seeds(p)
        dy = torch.randn(M, N)
        tilings = (
            {"lora_shrink": _configs._cfg(1, 1, BLOCK_M=16, BLOCK_K=32), "linear_lora_bwd_dx": _configs._gemm(16, 32, 16, 1, 1, 1)},
            {"lora_shrink": _configs._cfg(1, 1, BLOCK_M=32, BLOCK_K=64), "linear_lora_bwd_dx": _configs._gemm(32, 64, 32, 4, 1, 1)},
        )  # fmt: skip
        results = []
        for tiling in tilings:
            for op, cfg in tiling.items():
                monkeypatch.setitem(_configs.INTERPRET_CONFIGS, op, cfg)
            _, (shrink,) = tri.lora_linear_fwd(x, w, None, [a], [b], [None], [1.0], [p], seeds)
            dx, _, _ = tri.lora_linear_bwd(dy, x, w, [a], [b], [shrink], [1.0], [p], seeds, [True, False])
            results.append((shrink, dx))
        assert torch.equal(results[0][0], results[1][0])
        assert torch.equal(results[0][1], results[1][1])
        assert torch.equal(results[0][0] != 0, ref_mask(seeds[0], M, K, p))

    # ------------------------------------------------------------------------------------------------------
    # Capability reasons and dispatch
    # ------------------------------------------------------------------------------------------------------

    def _fwd_args(**overrides):
        args = dict(
            x=torch.randn(4, 16),
            weight=torch.randn(8, 16),
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
            ({"x": torch.randn(4, 16, dtype=torch.float64), "weight": torch.randn(8, 16, dtype=torch.float64)}, "float64"),
            ({"lora_a": [torch.randn(2, 16)] * 2, "lora_b": [torch.randn(8, 2)] * 2}, "2 active adapters"),
            ({"weight": torch.randn(8, 16, requires_grad=True)}, "requires_grad"),
            ({"lora_a": [torch.randn(300, 16)], "lora_b": [torch.randn(8, 300)]}, "r=300"),
            ({"dropout_p": [0.5]}, "seeds"),
            ({"lora_a": [torch.randn(2, 16, dtype=torch.float16)], "lora_b": [torch.randn(8, 2, dtype=torch.float16)]}, "lora_a.dtype"),
            ({"weight": torch.randn(8, 16, dtype=torch.bfloat16)}, "weight.dtype"),
            ({"x": torch.randn(0, 16)}, "M=0"),
        ],
    )  # fmt: skip
    def test_not_supported_reasons_name_the_bad_value(overrides, needle):
        reasons = tri.not_supported_reasons("lora_linear_fwd", *_fwd_args(**overrides))
        assert any(needle in r for r in reasons), reasons
        assert tri.not_supported_reasons("lora_linear_fwd", *_fwd_args()) == []

    def test_forced_triton_raises_with_reasons_and_auto_falls_back():
        x, w = torch.randn(3, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
        a, b = torch.randn(2, 16, dtype=torch.float64), torch.zeros(8, 2, dtype=torch.float64)
        with pytest.raises(NotImplementedError, match="float64"):
            ops.lora_linear(x, w, None, a, b, 1.0, backend="triton")
        y = ops.lora_linear(x, w, None, a, b, 1.0)  # automatic choice on CPU: the reference
        y_ref, _ = ref.lora_linear_fwd(x, w, None, [a], [b], [None], [1.0], [0.0], None)
        assert_close(y, y_ref, EXACT, name="y")
