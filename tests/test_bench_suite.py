"""The op benchmark suite (``peft-kernels bench``, ``benchmarks/test_ops.py``) runs on CPU and reports honest rows.

Tiny shapes only: these check the suite's plumbing and the claims its rows carry (outputs agree with the
reference, prefix K/V allocates less than PEFT's path), not speed.
"""

import csv
import os
import subprocess
import sys

import pytest
import torch
from _tolerances import BENCH_OUTPUT_REL

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    from peft_kernels import bench

    out = tmp_path_factory.mktemp("bench")
    csv_path, png = out / "rows.csv", out / "speedup.png"
    argv = ["--device", "cpu", "--size", "tiny", "--reps", "2", "--warmup", "0", "--no-progress"]
    argv += ["--providers", "peft,reference,triton,cuda", "--out", str(csv_path), "--plot", str(png)]
    assert bench.main(argv) == 0
    with open(csv_path) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.CSV_FIELDS
        rows = list(reader)
    return rows, png


def test_every_case_has_a_row_per_provider_with_versions(tiny_rows):
    from peft_kernels.bench.cases import select_cases

    rows, png = tiny_rows
    cases = select_cases("cpu", "tiny")
    assert len(rows) == 4 * len(cases)
    for row in rows:
        assert row["torch"] == torch.__version__ and row["git_sha"] and row["device"].startswith("cpu")
        assert row["peft"] == "0.21.2"
        if row["provider"] in ("triton", "cuda"):
            assert row["p50_ms"] == "" and "CUDA" in row["note"], row
        else:
            assert float(row["p50_ms"]) > 0 and not row["note"], row
            assert float(row["p20_ms"]) <= float(row["p50_ms"]) <= float(row["p80_ms"])
            assert int(row["peak_bytes"]) >= 0 and int(row["alloc_bytes"]) >= 0  # 0: in-place decode append
    assert png.stat().st_size > 1000


def test_reference_rows_agree_with_peft(tiny_rows):
    rows, _ = tiny_rows
    checked = 0
    for row in rows:
        if row["provider"] == "peft" and row["op"] != "lora_linear_int8" and row["max_rel_err"]:
            # peft's output against the reference backend's (the truth column of each case).
            assert float(row["max_rel_err"]) <= BENCH_OUTPUT_REL[torch.float32], row
            checked += 1
    assert checked >= 5


def test_prefix_kv_allocates_less_than_peft(tiny_rows):
    """Per call of the prefix path (encoder + per-layer caches): PEFT's encoder runs on B copies and its cache
    concatenates; ours encodes once and writes in place. Decode: one row per layer instead of a copy of all."""
    rows, _ = tiny_rows
    alloc = {
        (r["mode"], r["provider"]): int(r["alloc_bytes"]) for r in rows if r["op"] == "prefix_kv" and r["alloc_bytes"]
    }
    for mode in ("fwd", "fwd+bwd", "decode"):
        assert alloc[(mode, "reference")] < alloc[(mode, "peft")], (mode, alloc)


def test_saved_bytes_no_more_than_peft(tiny_rows):
    rows, _ = tiny_rows
    saved = {}
    for r in rows:
        if r["saved_bytes"]:
            saved[(r["op"], r["mode"], r["shape"], r["provider"])] = int(r["saved_bytes"])
    pairs = [(key, value) for key, value in saved.items() if key[3] == "reference"]
    assert pairs
    for (op, mode, shape, _), value in pairs:
        assert value <= saved[(op, mode, shape, "peft")], (op, mode, shape)


def test_pytest_benchmark_suite_runs(tmp_path):
    """benchmarks/test_ops.py collects every case x provider and its LoRA cases pass their output check."""
    pytest.importorskip("pytest_benchmark")
    pytest.importorskip("peft")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_ops.py"]
    cmd += ["--bench-size", "tiny", "--bench-ops", "lora_linear", "--benchmark-disable", "-x"]
    result = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    # 5 lora_linear cases x 6 providers (base: the ceiling): triton and cuda are skipped on CPU with their reason,
    # the rest pass.
    assert "20 passed, 10 skipped" in result.stdout, result.stdout[-1500:]


def test_bench_dispatch_rows_and_the_backend_function_is_restored():
    """``peft-kernels bench dispatch`` (the dispatch-cost measurement): every row, finite, and the reference
    function it swaps for an empty one during the empty-work rows is the real one again afterwards."""
    from peft_kernels.backends.reference import lora as reference
    from peft_kernels.bench.dispatch import measure_dispatch

    real = reference.lora_linear_fwd
    rows = measure_dispatch(calls=2, reps=3, warmup=1)
    assert reference.lora_linear_fwd is real
    expected = {"reference", "dispatch.run", "op", "torch floor", "empty work", "dispatch.run, empty work"}
    expected |= {"op, empty work", "dispatcher overhead", "dispatcher overhead, empty work", "torch custom-op call"}
    expected |= {"torch custom-op call, empty work", "torch floor, empty work"}
    expected |= {"inference op", "inference op - reference"}
    assert expected <= set(rows)
    for name in ("reference", "op", "empty work", "dispatch.run, empty work", "inference op"):
        p50, p20, p80 = rows[name]
        assert 0 < p20 <= p50 <= p80 < 1e6, (name, rows[name])


@pytest.mark.gpu
def test_cuda_graph_times_are_per_call_and_refuse_host_syncs():
    """One value per replay, each a positive per-call time of a graph that calls fn several times; a function that
    synchronizes with the host cannot be captured (the int8 benchmark then falls back to eager timing)."""
    from peft_kernels.bench import measure

    device = torch.device("cuda")
    a = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16)
    calls = [0]

    def fn():
        calls[0] += 1
        return a @ a

    times = measure.cuda_graph_times(fn, device, reps=5)
    assert len(times) == 5 and all(0 < t < 1 for t in times), times
    assert calls[0] > 2 + 1 + 1, "the timed graph holds a single call"  # warm-up 2, estimate 1, then many
    with pytest.raises(RuntimeError):
        measure.cuda_graph_times(lambda: (a @ a).sum().item(), device, reps=1)
    assert measure.l2_cold_copies(16 * 2**20, device) >= 2
