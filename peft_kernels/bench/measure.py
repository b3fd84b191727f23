"""How the benchmarks measure: time (interleaved, medians with p20/p80), peak memory, saved-for-backward bytes,
bytes allocated, and the versions every row is stamped with. Device-agnostic: CPU and CUDA take the same calls.

Time: every repetition calls each provider once, the order rotating from one repetition to the next, so machine
drift (a shared CPU box, GPU clocks) hits all providers alike. A ratio to PEFT is the median over the rounds of
the ratio within each round (``paired_ratio``), so a slow stretch of the machine cancels out of every ratio it
touches; the medians themselves are reported too.
CUDA calls are bracketed by synchronizes and timed with CUDA events; CPU calls with ``time.perf_counter``.
Memory on CUDA: ``max_memory_allocated`` above what was allocated before the call. Memory on CPU: the profiler's
allocator-level memory timeline (every CREATE and DESTROY, temporaries inside ops and autograd's backward too),
from which ``bytes allocated`` (sum of all allocations) and ``peak`` (largest running total of live bytes above
the start) follow. Both are deterministic on CPU for a given shape.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import time
import warnings
from typing import Callable

import torch


# ------------------------------------------------------------------------------------------------ time
def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80); with fewer than 3 samples p20/p80 are the min/max."""
    s = sorted(samples)
    if len(s) < 3:
        return statistics.median(s), s[0], s[-1]
    deciles = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), deciles[1], deciles[7]


def paired_ratio(reference: list[float], other: list[float]) -> float:
    """median_i(reference[i] / other[i]) over the rounds of ``interleaved_times`` (> 1: ``other`` is faster)."""
    return statistics.median(a / b for a, b in zip(reference, other, strict=True))


def append_rows(path: str, rows: list[dict], fields: list[str]) -> None:
    """Appends ``rows`` to the CSV at ``path`` (a header when the file is new). A file written before a column was
    added is rewritten once under the longer header, its rows keeping their values (the new column left empty),
    so one file keeps the history of every run; otherwise only its header is read."""
    import csv

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    old_fields = []
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            old_fields = next(csv.reader(f), [])
    if old_fields and set(fields) <= set(old_fields):  # every column already there: append under the file's order
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=old_fields, restval="").writerows(rows)
        return
    old_rows = []
    if old_fields:
        with open(path, newline="") as f:
            old_rows = list(csv.DictReader(f))
    fields = list(fields) + [name for name in old_fields if name not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(old_rows)
        writer.writerows(rows)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of fn (CUDA: events between synchronizes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(stop) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def interleaved_times(
    fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int
) -> dict[str, list[float]]:
    """{name: [seconds] * reps}: each repetition runs every fn once, in an order rotated by one each time."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            times[name].append(time_once(fns[name], device))
    return times


def cuda_graph_times(
    fn: Callable[[], object], device: torch.device, reps: int = 10, target_s: float = 0.05
) -> list[float]:
    """Seconds per call of fn, one value per replay of one CUDA graph holding many calls of fn (docs/KERNELS.md §12).

    The graph holds as many calls as take about ``target_s``, so one graph launch per replay is amortised over them
    and launch overhead does not count. Nothing flushes L2 between calls: a caller whose bytes must come from HBM
    rotates fn over enough copies of its weights (``l2_cold_copies``); the rotation is recorded into the graph.
    Raises what capture raises (a host synchronization, an allocation the graph cannot own): the caller falls
    back to eager timing and says so.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # capture needs warmed-up calls made on a side stream
        fn()
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    single = torch.cuda.CUDAGraph()
    with torch.cuda.graph(single):
        fn()
    single.replay()
    estimate = time_once(single.replay, device)
    calls = max(1, min(1000, int(target_s / max(estimate, 1e-7))))
    del single
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()  # untimed: first replay
    return [time_once(graph.replay, device) / calls for _ in range(reps)]


def l2_cold_copies(bytes_per_copy: int, device: torch.device, factor: float = 3.0) -> int:
    """How many copies of a weight of ``bytes_per_copy`` a decode benchmark rotates through so that ``factor``
    times the L2 size is read between two uses of one copy, i.e. every call reads its weight from HBM (at least 2).
    A 4096x4096 int8 weight (16 MiB) would otherwise stay in an H100's 50 MiB L2."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(2, math.ceil(factor * l2 / bytes_per_copy) + 1)


# ------------------------------------------------------------------------------------------------ memory
def allocations(fn: Callable[[], object], device: torch.device) -> tuple[int | None, int]:
    """(bytes allocated in total or None where unknown, peak live bytes above the start) of one call of fn."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return None, torch.cuda.max_memory_allocated(device) - before
    total, peak, _ = cpu_allocations(fn)
    return total, peak


def cpu_allocations(fn: Callable[[], object]) -> tuple[int, int, object]:
    """(bytes allocated in total, peak live bytes above the start, fn's result) of one call of fn on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            result = fn()
        timeline = prof._memory_profile().timeline
    total = live = peak = 0
    for _time, action, _key, nbytes in timeline:
        name = getattr(action, "name", str(action))
        if name == "CREATE":
            total += nbytes
            live += nbytes
            peak = max(peak, live)
        elif name == "DESTROY":
            live -= nbytes
    return total, peak, result


def saved_for_backward_bytes(fn: Callable[[], object], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while fn runs, storages of ``exclude`` (parameters,
    frozen weights) left out: what a backward keeps alive per call."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    del result
    return sum(storages.values())


# ------------------------------------------------------------------------------------------------ the device
# Dense peak throughput of the GPUs this project targets, by a substring of torch.cuda.get_device_name() (first
# match wins; vendor datasheet figures, SXM parts): (bf16 tensor-core FLOP/s without sparsity, HBM bytes/s).
DEVICE_PEAKS = (
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("A100-SXM4-40GB", 312e12, 1.555e12),
    ("A100-PCIE-40GB", 312e12, 1.555e12),
    ("A100", 312e12, 2.039e12),
)


def device_peaks(name: str) -> tuple[float | None, float | None]:
    """(peak FLOP/s, peak bytes/s) of the device called ``name``, (None, None) where unknown (every CPU)."""
    for key, flops, bandwidth in DEVICE_PEAKS:
        if key in name:
            return flops, bandwidth
    return None, None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def device_slug(device: torch.device) -> str:
    """File-name form of the device: ``cpu`` or e.g. ``nvidia-h200`` (results/<slug>.csv)."""
    if device.type != "cuda":
        return "cpu"
    return "-".join(torch.cuda.get_device_name(device).lower().replace("_", " ").split())


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata(device: torch.device) -> dict[str, str]:
    """The versions, device and revision every result row carries (packages read from their metadata, never
    imported: reading triton's version must not import triton outside backends/triton)."""
    import peft_kernels

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "peft_kernels": peft_kernels.__version__,
        "git_sha": git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
