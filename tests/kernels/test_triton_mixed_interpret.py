"""The mixed-adapter Triton kernels (backends/triton/lora_mixed.py) under TRITON_INTERPRET=1, against the reference.

As test_triton_interpret.py: a normal run executes this file again in a child pytest with the variable set.
Checked with the 2x-eager rule of tests/_tolerances.py (truth: the reference upcast to fp64 / fp32): awkward mixes
(one adapter, all base, every row different, ranks 4/8/16 mixed, prefill-like segments crossing tile edges),
2-D and 3-D x, fp32 / fp16 / bf16 with 16-bit or fp32 adapters, bias and lora_bias, Conv1D's transposed weight and
a strided x; the split-K shrink on its atomic and deterministic (workspace) paths; and a tiny GPT-2 mixed batch
routed through the layers to the Triton op.
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
        pytest.importorskip("triton")
        run_interpreter_suite(__file__, timeout=900)

    def test_cpu_tensors_need_the_interpreter():
        pytest.importorskip("triton")
        from peft_kernels.backends.triton import lora_mixed as tri

        x, w = torch.randn(4, 16), torch.randn(8, 16)
        a, b, g = torch.randn(2, 16), torch.randn(8, 2), torch.zeros(4, dtype=torch.int64)
        reasons = tri.not_supported_reasons("lora_linear_mixed", x, w, None, [a], [b], [None], [1.0], g)
        assert any("cpu" in r for r in reasons), reasons

else:
    pytest.importorskip("triton")
    from _models import logits_of, make_inputs, make_model
    from _tolerances import FP32_SAME_MATH, assert_close, assert_close_to_ref, truth_dtype

    import peft_kernels as pk
    from peft_kernels import ops
    from peft_kernels.backends.reference import lora_mixed as ref
    from peft_kernels.ops import _dispatch

    # (name, lead shape of x, K, N, ranks, row_adapter pattern, dtype, adapter dtype, bias, lora_bias, layout)
    CASES = [
        ("one-adapter", (17,), 33, 40, (8,), "all0", torch.float32, torch.float32, True, False, "contiguous"),
        ("all-base", (17,), 33, 40, (4, 8), "base", torch.bfloat16, torch.bfloat16, True, False, "contiguous"),
        ("every-row", (5,), 33, 70, (4, 8, 16, 4, 8), "distinct", torch.float16, torch.float16, False, True,
         "contiguous"),
        ("ranks-4-8-16", (37,), 33, 70, (4, 8, 16), "random", torch.bfloat16, torch.bfloat16, True, True,
         "contiguous"),
        ("fp32-adapters", (37,), 40, 33, (4, 8, 16), "random", torch.bfloat16, torch.float32, True, False,
         "contiguous"),
        ("fp32", (37,), 33, 40, (4, 17, 16), "random", torch.float32, torch.float32, True, True, "contiguous"),
        ("3d", (3, 7), 33, 40, (4, 8, 16), "random", torch.float16, torch.float32, True, False, "contiguous"),
        ("segments", (70,), 33, 40, (16, 4, 8), "sorted", torch.bfloat16, torch.bfloat16, False, False,
         "contiguous"),
        ("conv1d-strided", (19,), 33, 40, (4, 8), "random", torch.float32, torch.float32, True, False, "conv1d"),
    ]  # fmt: skip

    def _row_adapter(pattern: str, samples: int, n: int, gen) -> torch.Tensor:
        if pattern == "all0":
            return torch.zeros(samples, dtype=torch.int64)
        if pattern == "base":
            return torch.full((samples,), -1, dtype=torch.int64)
        if pattern == "distinct":
            return torch.randperm(n, generator=gen)[:samples]
        if pattern == "sorted":  # contiguous segments, as prefill batches of whole requests
            return torch.sort(torch.randint(-1, n, (samples,), generator=gen)).values
        g = torch.randint(-1, n, (samples,), generator=gen)
        g[:n] = torch.arange(n)  # every adapter used at least once
        return g

    def _inputs(case):
        name, lead, K, N, ranks, pattern, dtype, adtype, has_bias, has_lora_bias, layout = case
        gen = torch.Generator().manual_seed(hash(name) % 2**31)
        x = torch.randn(*lead, K + (3 if layout != "contiguous" else 0), generator=gen)[..., :K]
        if layout == "conv1d":
            weight = torch.randn(K, N, generator=gen).t()  # GPT-2 Conv1D: (in, out) storage, (N, K) view
        else:
            weight = torch.randn(N, K, generator=gen)
        bias = torch.randn(N, generator=gen) if has_bias else None
        lora_a = [torch.randn(r, K, generator=gen) / K**0.5 for r in ranks]
        lora_b = [torch.randn(N, r, generator=gen) for r in ranks]
        lora_b_bias = [
            torch.randn(N, generator=gen) if has_lora_bias and i % 2 == 0 else None for i in range(len(ranks))
        ]
        scaling = [0.5 + i for i in range(len(ranks))]
        g = _row_adapter(pattern, lead[0], len(ranks), gen)
        return dict(x=x, weight=weight, bias=bias, a=lora_a, b=lora_b, bb=lora_b_bias, s=scaling, g=g)

    def _cast(t, dtype):
        return None if t is None else t.to(dtype)

    def _call(inp, xd, ad, backend):
        return ops.lora_linear_mixed(
            _cast(inp["x"], xd), _cast(inp["weight"], xd), _cast(inp["bias"], xd),
            [_cast(t, ad) for t in inp["a"]], [_cast(t, ad) for t in inp["b"]], inp["s"], inp["g"],
            backend=backend, lora_b_bias_list=[_cast(t, ad) for t in inp["bb"]],
        )  # fmt: skip

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
    def test_triton_matches_reference(case):
        dtype, adtype = case[6], case[7]
        inp = _inputs(case)
        out = _call(inp, dtype, adtype, "triton")
        eager = _call(inp, dtype, adtype, "reference")
        td = truth_dtype(dtype)
        truth = _call(inp, td, td, "reference")
        assert out.dtype == dtype and out.shape == eager.shape == (*case[1], case[3])
        assert_close_to_ref(out, eager, truth, dtype, name=case[0])
        if case[5] == "base":  # all base: exactly x·Wᵀ + b up to summation order
            assert_close_to_ref(out, torch.nn.functional.linear(
                _cast(inp["x"], dtype), _cast(inp["weight"], dtype), _cast(inp["bias"], dtype)), truth, dtype)  # fmt: skip

    def test_rows_are_independent_of_their_neighbours():
        """Row i's output depends only on row i's adapter: permuting the batch permutes the output."""
        case = CASES[3]
        inp = _inputs(case)
        y = _call(inp, torch.float32, torch.float32, "triton")
        perm = torch.randperm(inp["x"].shape[0], generator=torch.Generator().manual_seed(5))
        shuffled = dict(inp, x=inp["x"][perm], g=inp["g"][perm])
        assert_close(_call(shuffled, torch.float32, torch.float32, "triton"), y[perm], FP32_SAME_MATH, "permuted")

    def test_stacked_adapter_cache_follows_in_place_updates():
        """A second call reuses the stacked adapters; an in-place update of one adapter (new _version) re-stacks."""
        from peft_kernels.backends.triton import lora_mixed as tri

        case = CASES[3]
        inp = _inputs(case)
        first = _call(inp, torch.float32, torch.float32, "triton")
        hits = len(tri._STACK_CACHE)
        assert_close(_call(inp, torch.float32, torch.float32, "triton"), first, (0.0, 0.0), "cached")
        assert len(tri._STACK_CACHE) == hits  # no new entry: the cached stack served the call
        with torch.no_grad():
            inp["b"][1].mul_(3.0)
        after = _call(inp, torch.float32, torch.float32, "triton")
        truth = _call(inp, torch.float64, torch.float64, "reference")
        assert_close_to_ref(after, _call(inp, torch.float32, torch.float32, "reference"), truth, torch.float32)
        assert not torch.equal(after, first)

    def test_deterministic_mode_is_reproducible():
        # K = 200 over BLOCK_K = 32 with the interpreter's 2 "SMs": the shrink splits K (workspace path).
        case = ("det", (9,), 200, 40, (4, 16), "random", torch.float32, torch.float32, True, False, "contiguous")
        inp = _inputs(case)
        atomic = _call(inp, torch.float32, torch.float32, "triton")
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            first = _call(inp, torch.float32, torch.float32, "triton")
            second = _call(inp, torch.float32, torch.float32, "triton")
        finally:
            torch.use_deterministic_algorithms(previous)
        assert torch.equal(first, second)
        truth = _call(inp, torch.float64, torch.float64, "reference")
        eager = _call(inp, torch.float32, torch.float32, "reference")
        assert_close_to_ref(first, eager, truth, torch.float32, "deterministic")
        assert_close_to_ref(atomic, eager, truth, torch.float32, "atomic")

    def test_gpt2_mixed_batch_through_the_layers_on_triton():
        """lora.Linear over Conv1D (transposed weight view, 3-D x) sends a mixed batch to the Triton op."""
        model = None
        base, _ = make_model("gpt2")
        for i, r in enumerate((4, 8, 16)):
            torch.manual_seed(i)
            config = pk.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=r * (i + 1), init_lora_weights=False)
            if model is None:
                model = pk.get_peft_model(base, config, adapter_name=f"a{i}")
            else:
                model.add_adapter(f"a{i}", config)
        model.eval()
        names = ["a2", "__base__", "a0", "a1"]
        inputs = make_inputs("gpt2", batch=len(names))
        calls = []
        original = ref.lora_linear_mixed
        with torch.no_grad():
            expected = logits_of(model(**inputs, adapter_names=names))
            with _dispatch.force_backend("triton"):
                from peft_kernels.backends.triton import lora_mixed as tri

                launch = tri.lora_linear_mixed

                def counting(*args):
                    calls.append(args[0].shape)
                    return launch(*args)

                tri.lora_linear_mixed = counting
                try:
                    got = logits_of(model(**inputs, adapter_names=names))
                finally:
                    tri.lora_linear_mixed = launch
        assert ref.lora_linear_mixed is original
        assert len(calls) == 2  # one c_attn per block, each one op call for the whole batch
        assert_close(got, expected, FP32_SAME_MATH, "gpt2 mixed: triton vs reference")
