"""Triton prefix K/V kernels (``backends/triton/prefix.py``): interpreter, ahead-of-time compile, GPU parity.

docs/KERNELS.md §11 for the prefix ops: ``fill`` and ``append`` are copies, bitwise equal to the reference (and so to the
``torch.cat`` construction); ``dprefix`` is the sequential fp32 sum over the batch, bitwise equal to the reference
and within the 2x rule of the fp64 sum.

- Interpreter (``TRITON_INTERPRET=1``, set before triton is imported): the normal run executes this file again in a
  child pytest with the variable set (``test_interpreter_suite``); ``TRITON_INTERPRET=1 pytest <this file>`` runs
  those checks in-process. Shapes cover one and several row / head-dim tiles, hd not a power of two, every layout
  the launchers distinguish (one allocation → one launch; separate allocations → one launch per layer; strided
  slices; zero-stride expanded gradients), fp32 / fp16 / bf16, bf16 ties, NaN and overflow in the gradient's
  rounding, the autograd Functions and ``PrefixKVCache`` on a model with the Triton backend.
- Ahead of time (no GPU needed): every kernel for sm_80 and sm_90 in fp32 / fp16 / bf16 at the block sizes the
  heuristic picks for decode (T = 1) and training shapes, and a check that contiguous rows move as 16-byte vectors.
- GPU (``@pytest.mark.gpu``): the same bitwise checks on CUDA tensors, and the cache on a model.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from _interpret import run_interpreter_suite

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (L, B, Hkv, P, hd): one tile; hd 59; P = 40 at hd 128 (3 row tiles of 16); hd 300 (2 head-dim tiles of 256).
FILL_SHAPES = {
    "tiny": (1, 1, 1, 1, 8),
    "odd_hd": (3, 2, 2, 5, 59),
    "row_tiles": (2, 2, 1, 40, 128),
    "hd_tiles": (1, 2, 1, 3, 300),
}
# (B, Hkv, T, hd, offset): decode (T = 1), several row tiles, several head-dim tiles.
APPEND_SHAPES = {
    "decode": (2, 3, 1, 59, 5),
    "one_tile": (1, 1, 3, 8, 0),
    "row_tiles": (2, 2, 40, 128, 7),
    "hd_tiles": (1, 2, 3, 300, 2),
}


def _layers(layout, n_layers, batch, heads, rows, head_dim, dtype, device, fill=float("nan")):
    """(k_bufs, v_bufs) in the layout: "storage" (views of one allocation, as PrefixKVCache allocates),
    "separate" (one allocation each) or "strided" (slices of padded allocations)."""
    if layout == "storage":
        big = torch.full((n_layers, 2, batch, heads, rows, head_dim), fill, dtype=dtype, device=device)
        return [big[i, 0].data for i in range(n_layers)], [big[i, 1].data for i in range(n_layers)]
    if layout == "separate":
        make = lambda: torch.full((batch, heads, rows, head_dim), fill, dtype=dtype, device=device)
        return [make() for _ in range(n_layers)], [make() for _ in range(n_layers)]
    padded = lambda: torch.full((batch, heads + 1, rows + 2, head_dim + 3), fill, dtype=dtype, device=device)
    return (
        [padded()[:, 1:, 1 : rows + 1, :head_dim] for _ in range(n_layers)],
        [padded()[:, :heads, 2:, 3:] for _ in range(n_layers)],
    )


def _same(a, b) -> bool:
    """Bitwise equality, NaN sentinels included."""
    return a.dtype == b.dtype and torch.equal(a.view(_int_of(a)), b.view(_int_of(b)))


def _int_of(t):
    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


def _sequential_sum(grads_k, grads_v, prefix_len):
    """[L, 2, Hkv, P, hd]: Σ_b in order in fp32, rounded once (the reference's accumulation, written out)."""
    rows = [torch.stack([gk[:, :, :prefix_len], gv[:, :, :prefix_len]]) for gk, gv in zip(grads_k, grads_v)]
    stacked = torch.stack(rows)  # [L, 2, B, Hkv, P, hd]
    total = torch.zeros(stacked[:, :, 0].shape, dtype=torch.float32, device=stacked.device)
    for b in range(stacked.shape[2]):
        total += stacked[:, :, b].float()
    return total.to(grads_k[0].dtype)


# ------------------------------------------------------------------------------------------------ shared checks
def check_fill(tri, device, shape_id, dtype, layout):
    from peft_kernels.backends.reference import prefix as ref

    n_layers, batch, heads, prefix_len, head_dim = FILL_SHAPES[shape_id]
    rows = prefix_len + 4
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randn(n_layers, 2, heads, prefix_len, head_dim, generator=gen).to(device, dtype)
    k_bufs, v_bufs = _layers(layout, n_layers, batch, heads, rows, head_dim, dtype, device)
    ref_k, ref_v = _layers(layout, n_layers, batch, heads, rows, head_dim, dtype, device)
    assert tri.not_supported_reasons("prefix_kv_fill", prefix, k_bufs, v_bufs) == []
    one_launch = tri._layer_stride(k_bufs) is not None and tri._layer_stride(v_bufs) is not None
    assert one_launch == (layout == "storage" or n_layers == 1), layout
    tri.prefix_kv_fill(prefix, k_bufs, v_bufs)
    ref.prefix_kv_fill(prefix, ref_k, ref_v)
    for got, expected in zip(k_bufs + v_bufs, ref_k + ref_v):
        assert _same(got, expected)
        assert torch.isnan(got[:, :, prefix_len:]).all(), "rows past P must stay untouched"


def check_append(tri, device, shape_id, dtype, transposed):
    from peft_kernels.backends.reference import prefix as ref

    batch, heads, new, head_dim, offset = APPEND_SHAPES[shape_id]
    rows = offset + new + 3
    gen = torch.Generator().manual_seed(1)
    if transposed:  # [B, T, Hkv, hd] → [B, Hkv, T, hd] view: transformers' layout before .transpose(1, 2)
        k = torch.randn(batch, new, heads, head_dim, generator=gen).to(device, dtype).transpose(1, 2)
        v = torch.randn(batch, new, heads, head_dim, generator=gen).to(device, dtype).transpose(1, 2)
    else:
        k = torch.randn(batch, heads, new, head_dim, generator=gen).to(device, dtype)
        v = torch.randn(batch, heads, new, head_dim, generator=gen).to(device, dtype)
    (k_buf,), (v_buf,) = _layers("storage", 1, batch, heads, rows, head_dim, dtype, device)
    (ref_k,), (ref_v,) = _layers("storage", 1, batch, heads, rows, head_dim, dtype, device)
    assert tri.not_supported_reasons("kv_append", k_buf, v_buf, k, v, offset) == []
    tri.kv_append(k_buf, v_buf, k, v, offset)
    ref.kv_append(ref_k, ref_v, k, v, offset)
    assert _same(k_buf, ref_k) and _same(v_buf, ref_v)
    assert torch.equal(k_buf[:, :, offset : offset + new], k) and torch.equal(v_buf[:, :, offset : offset + new], v)
    untouched = torch.cat([k_buf[:, :, :offset], k_buf[:, :, offset + new :]], dim=2)
    assert torch.isnan(untouched).all()


def check_fill_bwd(tri, device, shape_id, dtype, layout):
    from _tolerances import assert_close_to_ref

    from peft_kernels.backends.reference import prefix as ref

    n_layers, batch, heads, prefix_len, head_dim = FILL_SHAPES[shape_id]
    rows = prefix_len + 3
    gen = torch.Generator().manual_seed(2)
    if layout == "expanded":  # autograd hands zero-stride gradients to backward (e.g. from .sum())
        grads_k = [torch.randn(1, heads, rows, head_dim, generator=gen).to(device, dtype).expand(batch, -1, -1, -1)]
        grads_v = [torch.randn(1, 1, rows, 1, generator=gen).to(device, dtype).expand(batch, heads, -1, head_dim)]
        grads_k, grads_v = grads_k * n_layers, grads_v * n_layers
    else:
        grads_k, grads_v = _layers(layout, n_layers, batch, heads, rows, head_dim, dtype, device, fill=0.0)
        for g in grads_k + grads_v:
            g.copy_(torch.randn(g.shape, generator=gen).to(device, dtype))
    assert tri.not_supported_reasons("prefix_kv_fill_bwd", grads_k, grads_v, prefix_len) == []
    out = tri.prefix_kv_fill_bwd(grads_k, grads_v, prefix_len)
    assert out.shape == (n_layers, 2, heads, prefix_len, head_dim) and out.dtype == dtype
    assert _same(out, ref.prefix_kv_fill_bwd(grads_k, grads_v, prefix_len))
    assert _same(out, _sequential_sum(grads_k, grads_v, prefix_len))
    # 2x rule against the fp64 sum, eager baseline torch.sum in the dtype.
    stacked = torch.stack([torch.stack([gk, gv]) for gk, gv in zip(grads_k, grads_v)])[..., :prefix_len, :]
    truth = stacked.double().sum(dim=2)
    eager = stacked.sum(dim=2)
    assert_close_to_ref(out, eager, truth, dtype, name=f"dprefix {shape_id} {layout}")


def check_cache_on_a_model(device, dtype):
    """A decoder forward without autograd (generate's prefill), then one decode step, on a PrefixKVCache whose
    prefix fill and in-place appends run on the named backend (forced: Triton runs or raises): the Triton and the
    reference backends give equal logits. A forward that records autograd concatenates instead (no backend op;
    docs/KERNELS.md §7); the ops' gradients are checked by check_fill_bwd and tests/kernels/test_ops_prefix.py."""
    from _models import make_model

    from peft_kernels.tuners.prefix_kv_cache import PrefixKVCache

    base = make_model("llama")[0].to(device, dtype)
    prefix = torch.randn(2, 2, 2, 3, 8, device=device, dtype=dtype)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]], device=device)
    results = {}
    for backend in ("triton", "reference"):
        with torch.no_grad():
            cache = PrefixKVCache(prefix, 2, max_cache_len=8, backend=backend)
            logits = base(input_ids=ids, past_key_values=cache, attention_mask=torch.ones(2, 7, device=device)).logits
            step = base(input_ids=ids[:, :1], past_key_values=cache, attention_mask=torch.ones(2, 8, device=device))
        results[backend] = (logits, step.logits)
    assert torch.equal(results["triton"][0], results["reference"][0])
    assert torch.equal(results["triton"][1], results["reference"][1])


if not INTERPRETING:
    triton = pytest.importorskip("triton")

    from peft_kernels.backends.triton import _launch
    from peft_kernels.backends.triton import prefix as tri

    @pytest.mark.interpret
    def test_interpreter_suite():
        """Runs this file's checks in a child pytest with TRITON_INTERPRET=1 set before triton is imported."""
        run_interpreter_suite(__file__, timeout=600)

    def test_cpu_tensors_need_the_interpreter():
        prefix = torch.randn(1, 2, 1, 2, 8)
        reasons = tri.not_supported_reasons(
            "prefix_kv_fill", prefix, [torch.empty(1, 1, 4, 8)], [torch.empty(1, 1, 4, 8)]
        )
        assert any("cpu" in r for r in reasons), reasons

    # ------------------------------------------------------------------------------------------ ahead of time
    from triton.backends.compiler import GPUTarget  # noqa: E402
    from triton.compiler import ASTSource  # noqa: E402

    _TRITON_DTYPE = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}

    def _example_args(op: str, dtype: str, rows: int, head_dim: int = 128) -> dict:
        """Launch arguments of a Llama-class cache (B=8, Hkv=8, S=2080, 32 layers), contiguous as allocated."""
        batch, heads, cap = 8, 8, 2080
        buf = dict(b=heads * cap * head_dim, h=cap * head_dim, s=head_dim)
        if op == "prefix_kv_fill":
            return dict(
                prefix_ptr=dtype, k_ptr=dtype, v_ptr=dtype, B=batch, H=heads, P=rows, D=head_dim,
                stride_pl=2 * heads * rows * head_dim, stride_pkv=heads * rows * head_dim, stride_ph=rows * head_dim,
                stride_pp=head_dim, stride_pd=1,
                stride_kl=2 * batch * buf["b"], stride_kb=buf["b"], stride_kh=buf["h"], stride_ks=buf["s"], stride_kd=1,
                stride_vl=2 * batch * buf["b"], stride_vb=buf["b"], stride_vh=buf["h"], stride_vs=buf["s"], stride_vd=1,
            )  # fmt: skip
        if op == "kv_append":  # k, v as transformers hands them over: [B, T, Hkv, hd].transpose(1, 2)
            return dict(
                k_buf_ptr=dtype, v_buf_ptr=dtype, k_ptr=dtype, v_ptr=dtype, H=heads, T=rows, D=head_dim, offset=32,
                stride_kbb=buf["b"], stride_kbh=buf["h"], stride_kbs=buf["s"], stride_kbd=1,
                stride_vbb=buf["b"], stride_vbh=buf["h"], stride_vbs=buf["s"], stride_vbd=1,
                stride_kb=rows * heads * head_dim, stride_kh=head_dim, stride_kt=heads * head_dim, stride_kd=1,
                stride_vb=rows * heads * head_dim, stride_vh=head_dim, stride_vt=heads * head_dim, stride_vd=1,
            )  # fmt: skip
        return dict(  # gradients: one launch per layer (layer stride 0)
            dk_ptr=dtype, dv_ptr=dtype, out_ptr=dtype, B=batch, H=heads, P=rows, D=head_dim,
            stride_dkl=0, stride_dkb=buf["b"], stride_dkh=buf["h"], stride_dks=buf["s"], stride_dkd=1,
            stride_dvl=0, stride_dvb=buf["b"], stride_dvh=buf["h"], stride_dvs=buf["s"], stride_dvd=1,
            stride_ol=2 * heads * rows * head_dim, stride_okv=heads * rows * head_dim, stride_oh=rows * head_dim,
            stride_op=head_dim, stride_od=1,
        )  # fmt: skip

    def compile_kernel(op: str, cap: int, dtype: str, rows: int, head_dim: int = 128):
        """triton.compile for sm_<cap>, specialised as the runtime specialises these arguments (ints equal to 1
        become constants, multiples of 16 (0 included) and pointers get 16-divisibility)."""
        kernel = tri.KERNELS[op]
        block_r, block_d, num_warps = tri.blocks(rows, head_dim)
        values = {**_example_args(op, dtype, rows, head_dim), "BLOCK_R": block_r, "BLOCK_D": block_d}
        signature, constexprs, attrs = {}, {}, {}
        for i, param in enumerate(kernel.params):
            value = values[param.name]
            if param.is_constexpr or (isinstance(value, int) and value == 1):
                signature[param.name], constexprs[param.name] = "constexpr", value
            elif isinstance(value, str):
                signature[param.name], attrs[(i,)] = value, [["tt.divisibility", 16]]
            else:
                signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        options = {"num_warps": num_warps, "enable_fp_fusion": _launch.FP_FUSION}
        return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)

    # (op, rows): the fill and the gradient at P = 32; the append at decode (T = 1) and at training length.
    _AOT_CASES = [("prefix_kv_fill", 32), ("kv_append", 1), ("kv_append", 2048), ("prefix_kv_fill_bwd", 32)]

    @pytest.mark.parametrize("cap", [80, 90])
    def test_every_kernel_compiles_ahead_of_time(cap):
        failures = []
        for op, rows in _AOT_CASES:
            for dtype in _TRITON_DTYPE.values():
                try:
                    compiled = compile_kernel(op, cap, dtype, rows)
                except Exception as exc:  # collect every failure
                    failures.append(f"{op} rows={rows} {dtype} sm_{cap}: {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                assert compiled.metadata.shared <= 48 * 1024, (op, rows, dtype, compiled.metadata.shared)
        assert not failures, "\n".join(failures)

    @pytest.mark.parametrize("op, rows", [("prefix_kv_fill", 32), ("kv_append", 2048), ("prefix_kv_fill_bwd", 32)])
    def test_contiguous_rows_move_as_16_byte_vectors(op, rows):
        """Memory-bound copies: with hd = 128 contiguous (bf16), every global load and store is a 16-byte vector."""
        ptx = compile_kernel(op, 90, "*bf16", rows).asm["ptx"]
        accesses = set(re.findall(r"\b((?:ld|st)\.global(?:\.[a-z0-9]+)*)", ptx))
        assert accesses, ptx[:2000]
        assert all(".v4.b32" in a for a in accesses), accesses

    # ------------------------------------------------------------------------------------------ GPU
    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape_id", list(FILL_SHAPES))
    @pytest.mark.parametrize("layout", ["storage", "separate", "strided"])
    def test_gpu_fill_matches_reference(layout, shape_id, dtype):
        check_fill(tri, "cuda", shape_id, dtype, layout)

    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape_id", list(APPEND_SHAPES))
    @pytest.mark.parametrize("transposed", [False, True])
    def test_gpu_append_matches_reference(transposed, shape_id, dtype):
        check_append(tri, "cuda", shape_id, dtype, transposed)

    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape_id", list(FILL_SHAPES))
    @pytest.mark.parametrize("layout", ["storage", "separate", "expanded"])
    def test_gpu_fill_bwd_matches_reference(layout, shape_id, dtype):
        check_fill_bwd(tri, "cuda", shape_id, dtype, layout)

    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_gpu_cache_on_a_model(dtype):
        check_cache_on_a_model("cuda", dtype)

else:
    triton = pytest.importorskip("triton")

    from peft_kernels.backends.triton import prefix as tri
    from peft_kernels.ops import _dispatch, kv_append, prefix_kv_write

    pytestmark = pytest.mark.interpret

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape_id", list(FILL_SHAPES))
    @pytest.mark.parametrize("layout", ["storage", "separate", "strided"])
    def test_fill_matches_reference(layout, shape_id, dtype):
        check_fill(tri, "cpu", shape_id, dtype, layout)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape_id", list(APPEND_SHAPES))
    @pytest.mark.parametrize("transposed", [False, True])
    def test_append_matches_reference(transposed, shape_id, dtype):
        check_append(tri, "cpu", shape_id, dtype, transposed)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape_id", ["tiny", "odd_hd", "row_tiles", "hd_tiles"])
    @pytest.mark.parametrize("layout", ["storage", "separate", "expanded"])
    def test_fill_bwd_matches_reference(layout, shape_id, dtype):
        check_fill_bwd(tri, "cpu", shape_id, dtype, layout)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_cache_on_a_model(dtype):
        check_cache_on_a_model("cpu", dtype)

    @pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
    def test_fill_bwd_rounds_to_nearest_even_like_torch():
        """bf16 ties (1.0078125 + 2⁻⁸ rounds up to even, 1 + 2⁻⁸ down), overflow to inf, NaN: as torch's .to(bf16)."""
        # (bf16 subnormals are left out: the interpreter's bf16 → fp32 conversion flushes them to zero.)
        first = torch.tensor([1.0, 1.0078125, 3.3e38, float("nan"), -1.0078125])
        second = torch.tensor([2.0**-8, 2.0**-8, 3.3e38, 1.0, -(2.0**-8)])
        grads = torch.stack([first, second]).to(torch.bfloat16).view(2, 1, 1, 5)  # [B=2, H=1, S=1, hd=5]
        out = tri.prefix_kv_fill_bwd([grads], [grads], 1)
        expected = (grads[0].float() + grads[1].float()).to(torch.bfloat16)
        for got in (out[0, 0], out[0, 1]):
            # NaN payloads differ between torch's CPU conversion and any kernel; NaN positions must not.
            assert torch.equal(torch.isnan(got), torch.isnan(expected))
            assert _same(got[~torch.isnan(got)], expected[~torch.isnan(expected)])
        assert out[0, 0, 0, 0, 1].item() == 1.015625 and out[0, 0, 0, 0, 0].item() == 1.0
        assert torch.isinf(out[0, 0, 0, 0, 2]) and torch.isnan(out[0, 0, 0, 0, 3])

    @pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
    def test_unsupported_dtype_is_a_reason_and_forced_triton_raises(dtype):
        prefix = torch.zeros(1, 2, 1, 2, 8, dtype=dtype)
        bufs = [torch.zeros(1, 1, 4, 8, dtype=dtype)]
        reasons = tri.not_supported_reasons("prefix_kv_fill", prefix, bufs, bufs)
        assert any(str(dtype) in r for r in reasons), reasons
        with pytest.raises(NotImplementedError, match="triton"):
            prefix_kv_write(prefix, bufs, [torch.zeros(1, 1, 4, 8, dtype=dtype)], backend="triton")
        prefix_kv_write(prefix, bufs, [torch.zeros(1, 1, 4, 8, dtype=dtype)])  # automatic: the reference

    def test_mixed_dtypes_are_a_reason():
        k_buf, v_buf = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8)
        k, v = torch.zeros(1, 1, 1, 8, dtype=torch.float16), torch.zeros(1, 1, 1, 8)
        reasons = tri.not_supported_reasons("kv_append", k_buf, v_buf, k, v, 0)
        assert any("k is torch.float16" in r for r in reasons), reasons

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_autograd_through_the_ops(dtype):
        """prefix_kv_write + kv_append with backend="triton", backward forced onto Triton: same values and
        gradients, bitwise, as the reference backend."""
        gen = torch.Generator().manual_seed(3)
        prefix0 = torch.randn(3, 2, 2, 5, 16, generator=gen).to(dtype)
        k0 = [torch.randn(2, 2, 4, 16, generator=gen).to(dtype) for _ in range(3)]
        weight = torch.randn(2, 2, 9, 16, generator=gen).to(dtype)
        results = {}
        for backend in ("triton", "reference"):
            prefix = prefix0.clone().requires_grad_(True)
            ks = [k.clone().requires_grad_(True) for k in k0]
            big = prefix.new_empty((3, 2, 2, 2, 9, 16)).detach()
            k_bufs, v_bufs = [big[i, 0].data for i in range(3)], [big[i, 1].data for i in range(3)]
            k_bufs, v_bufs = prefix_kv_write(prefix, k_bufs, v_bufs, backend=backend)
            loss = 0
            for layer in range(3):
                kb, vb = kv_append(k_bufs[layer], v_bufs[layer], ks[layer], 2 * ks[layer], 5, backend=backend)
                loss = loss + (kb * weight).float().sum() + (vb * weight).float().pow(2).sum()
            with _dispatch.force_backend(backend):
                loss.backward()
            results[backend] = ([t.detach().clone() for t in k_bufs + v_bufs], prefix.grad, [k.grad for k in ks])
        got, expected = results["triton"], results["reference"]
        assert all(torch.equal(a, b) for a, b in zip(got[0], expected[0]))
        assert torch.equal(got[1], expected[1])
        assert all(torch.equal(a, b) for a, b in zip(got[2], expected[2]))

    def test_prefix_cache_with_the_triton_backend():
        """PrefixKVCache(backend="triton") through a prefill with gradients (one concatenation per layer, no
        backend op) and a decode past its planned rows (in-place appends and regrowth on the named backend): every
        returned key/value bitwise equal to a DynamicCache holding the broadcast prefix, and dprefix bitwise equal
        to the DynamicCache's."""
        from transformers.cache_utils import DynamicCache

        from peft_kernels.tuners.prefix_kv_cache import PrefixKVCache

        gen = torch.Generator().manual_seed(4)
        n_layers, batch, heads, prefix_len, head_dim = 2, 3, 2, 4, 8
        prefix0 = torch.randn(n_layers, 2, heads, prefix_len, head_dim, generator=gen)
        prefill = [torch.randn(2, batch, heads, 5, head_dim, generator=gen) for _ in range(n_layers)]
        decode = [
            [torch.randn(2, batch, heads, 1, head_dim, generator=gen) for _ in range(n_layers)] for _ in range(3)
        ]
        weight = torch.randn(batch, heads, prefix_len + 5, head_dim, generator=gen)
        grads = {}
        for backend in ("triton", "reference"):
            prefix = prefix0.clone().requires_grad_(True)
            dynamic_prefix = prefix0.clone().requires_grad_(True)
            cache = PrefixKVCache(prefix, batch, max_cache_len=prefix_len + 5, backend=backend)
            dynamic = DynamicCache(
                [(p[0].expand(batch, -1, -1, -1), p[1].expand(batch, -1, -1, -1)) for p in dynamic_prefix]
            )
            loss = expected_loss = 0
            for layer, (k, v) in enumerate(prefill):
                keys, values = cache.update(k, v, layer)
                expected = dynamic.update(k, v, layer)
                assert torch.equal(keys, expected[0]) and torch.equal(values, expected[1])
                loss = loss + (keys * weight).sum() + (values * weight).pow(2).sum()
                expected_loss = expected_loss + (expected[0] * weight).sum() + (expected[1] * weight).pow(2).sum()
            with _dispatch.force_backend(backend):
                loss.backward()
            expected_loss.backward()
            assert torch.equal(prefix.grad, dynamic_prefix.grad)
            grads[backend] = prefix.grad
            with torch.no_grad():
                for step in decode:  # one row per step past the planned P + 5 rows: the buffers grow
                    for layer, (k, v) in enumerate(step):
                        keys, values = cache.update(k, v, layer)
                        expected = dynamic.update(k, v, layer)
                        assert torch.equal(keys, expected[0]) and torch.equal(values, expected[1])
            assert cache.get_seq_length() == dynamic.get_seq_length() == prefix_len + 8
        assert torch.equal(grads["triton"], grads["reference"])
