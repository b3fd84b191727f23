"""The op benchmarks under pytest-benchmark: one benchmark per case × provider, grouped by case.

    python -m pytest benchmarks/test_ops.py --benchmark-only [--bench-size tiny|quick|full] [--bench-ops lora_linear]
        [--benchmark-json out.json] [--benchmark-group-by group]

Same cases, providers and measurements as ``peft-kernels bench`` (``peft_kernels/bench/``), which also writes the
CSV rows and the plot and interleaves providers within each repetition (ratios from one run); here each provider
is timed in its own pytest-benchmark loop (``pedantic``, one call per round, CUDA synchronized inside the
call). ``extra_info`` carries FLOPs, minimal bytes, saved-for-backward and peak bytes. Providers that cannot run
on this device are skipped with their reason. Every measured output is first checked against the reference
backend's (``BENCH_OUTPUT_REL``), so a fast wrong kernel fails instead of being timed.
"""

import pytest
import torch
from _tolerances import BENCH_OUTPUT_REL

from peft_kernels.bench import TRAINING_MODES, flat_output, measure, mode_fn, saved_bytes
from peft_kernels.bench.providers import CEILING_PROVIDER, PROVIDERS, Unavailable, backend_of, build_problem

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 10


@pytest.mark.parametrize("provider", PROVIDERS)
def test_op(benchmark, case, provider):
    problem = build_problem(case, DEVICE)
    try:
        forward, run = mode_fn(problem, provider, case.mode)
        run()
    except (Unavailable, NotImplementedError) as exc:
        pytest.skip(f"{provider} cannot run {case.label} here: {str(exc).splitlines()[0]}")

    int8_peft = provider == "peft" and case.op == "lora_linear_int8"
    # The ceiling provider computes x·Wᵀ + b alone: another function, nothing to compare with the reference.
    compared = provider not in ("reference", CEILING_PROVIDER) and not int8_peft
    if getattr(case.shape, "p", 0.0) == 0.0 and compared:
        ref = flat_output(mode_fn(problem, "reference", case.mode)[0], case.op, "reference")
        got = flat_output(forward, case.op, backend_of(provider))
        rel = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        assert rel <= BENCH_OUTPUT_REL[problem.dtype], f"{provider} output differs from the reference: {rel:.2e}"

    info = benchmark.extra_info
    info.update(op=case.op, mode=case.mode, dims=case.shape.dims, provider=provider, dtype=str(problem.dtype))
    info.update(flops=case.flops(), min_bytes=case.min_bytes(torch.finfo(problem.dtype).bits // 8, 4))
    if case.mode in TRAINING_MODES:
        info["saved_bytes"] = saved_bytes(problem, provider, forward)
    info["alloc_bytes"], info["peak_bytes"] = measure.allocations(run, DEVICE)
    benchmark.group = case.label

    def timed():
        run()
        measure.synchronize(DEVICE)

    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1)
