"""``peft-kernels bench``: the op benchmarks (LoRA linear, int8 LoRA linear, prefix K/V) of every provider that can
run on this device, side by side, with a table, CSV rows and a PNG of the speedups over PEFT.

    peft-kernels bench dispatch      # µs per call of the op route vs the reference called directly (dispatch.py)
    peft-kernels bench [--device cpu|cuda] [--size quick|full|tiny] [--ops lora_linear,lora_linear_int8,prefix_kv]
                       [--modes fwd,bwd,fwd+bwd,no-grad-fwd,decode] [--providers peft,reference,...]
                       [--reps 10] [--out rows.csv] [--plot speedup.png]

What is measured and how: ``cases`` (ops, modes, shapes, FLOP and byte counts), ``providers`` (the
implementations, on identical weights and inputs), ``measure`` (interleaved timing, memory, saved bytes). Per row:
median time with p20/p80, TFLOP/s (linear ops; GB/s of the minimal bytes for decode-sized linears and prefix_kv)
and its fraction of the device's peak where known, bytes allocated (CPU) and peak memory of one call,
saved-for-backward bytes, the ratio peft p50 / provider p50 (> 1: faster than PEFT), and the largest error of
the provider's output relative to the reference backend's (dropout rows: blank). CPU numbers say nothing about
GPU speed. ``benchmarks/test_ops.py`` runs the same cases under pytest-benchmark.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from . import measure
from .cases import DECODE_TOKENS_MAX, LINEAR_MODES, OPS, PREFIX_MODES, Case, select_cases
from .providers import (
    CEILING_PROVIDER,
    PROVIDERS,
    Unavailable,
    _as_list,
    backend_of,
    build_problem,
    check_backend,
    pinned,
)

CSV_FIELDS = (
    "op", "mode", "shape", "dims", "provider", "dtype", "p50_ms", "p20_ms", "p80_ms", "tflops", "gbps",
    "frac_of_peak", "alloc_bytes", "peak_bytes", "saved_bytes", "speedup_vs_peft", "ratio_vs_peft", "max_rel_err",
    "reps", "note",
    "device", "torch", "cuda", "triton", "transformers", "peft", "bitsandbytes", "peft_kernels", "git_sha",
    "timestamp",
)  # fmt: skip
TRAINING_MODES = ("fwd", "bwd", "fwd+bwd")


def mode_fn(problem, provider: str, mode: str):
    """A callable running one call of ``mode`` for ``provider`` (raises Unavailable / NotImplementedError)."""
    check_backend(provider, problem.device)
    forward = problem.forward(provider)
    op, backend = problem.case.op, backend_of(provider)
    leaves = problem.inputs

    def clear_grads():
        for leaf in leaves:
            leaf.grad = None

    if mode in ("no-grad-fwd", "decode"):

        def run():
            with pinned(op, backend), torch.no_grad():
                return forward()

    elif mode == "fwd":

        def run():
            with pinned(op, backend):
                return forward()

    elif mode == "fwd+bwd":

        def run():
            clear_grads()
            with pinned(op, backend):
                outputs = _as_list(forward())
                torch.autograd.backward(outputs, problem.grad_outputs(outputs))
            return outputs

    elif mode == "bwd":
        with pinned(op, backend):
            outputs = _as_list(forward())
        grads = problem.grad_outputs(outputs)

        def run():
            clear_grads()
            with pinned(op, backend):
                torch.autograd.backward(outputs, grads, retain_graph=True)
            return outputs

    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {LINEAR_MODES + PREFIX_MODES}")
    return forward, run


def saved_bytes(problem, provider: str, forward) -> int:
    """Bytes autograd saves for backward in one forward of ``provider`` (weights excluded)."""

    def pinned_forward():
        with pinned(problem.case.op, backend_of(provider)):
            return forward()

    return measure.saved_for_backward_bytes(pinned_forward, problem.frozen)


def flat_output(forward, op: str, backend: str | None) -> torch.Tensor:
    with pinned(op, backend), torch.no_grad():
        return torch.cat([t.detach().reshape(-1).double() for t in _as_list(forward())])


def bench_case(case: Case, device: torch.device, providers, reps: int, warmup: int) -> list[dict]:
    """Rows of one case: every provider measured side by side (providers that cannot run get a note)."""
    problem = build_problem(case, device)
    runs, forwards, notes = {}, {}, {}
    for provider in providers:
        try:
            forwards[provider], runs[provider] = mode_fn(problem, provider, case.mode)
            runs[provider]()  # the first call: compilation, autotuning, lazy allocations; and a capability probe
            measure.synchronize(device)
        except (Unavailable, NotImplementedError) as exc:
            notes[provider] = f"not run: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        except Exception as exc:  # one provider failing must not lose the others' rows; the error is recorded
            notes[provider] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if provider in notes:
            runs.pop(provider, None)
            forwards.pop(provider, None)

    truth = None
    if getattr(case.shape, "p", 0.0) == 0.0:  # dropout draws differ between providers: no error column
        base = "reference" if "reference" in forwards else next(iter(forwards), None)
        if base is not None:
            truth = flat_output(forwards[base], case.op, backend_of(base))
    saved, memory, errors = {}, {}, {}
    for provider, run in runs.items():
        if case.mode in TRAINING_MODES:
            saved[provider] = saved_bytes(problem, provider, forwards[provider])
        memory[provider] = measure.allocations(run, device)
        if truth is not None and provider != CEILING_PROVIDER:  # the ceiling computes x·Wᵀ + b alone
            got = flat_output(forwards[provider], case.op, backend_of(provider))
            errors[provider] = ((got - truth).abs().max() / truth.abs().max().clamp_min(1e-30)).item()
    times = measure.interleaved_times(runs, device, reps, warmup)

    peak_flops, peak_bandwidth = measure.device_peaks(measure.device_name(device))
    act_bytes = torch.finfo(problem.dtype).bits // 8
    flops = case.flops()
    memory_bound = flops is None or case.shape.M <= DECODE_TOKENS_MAX
    peft_p50 = measure.quantiles(times["peft"])[0] if "peft" in times else None
    rows = []
    for provider in providers:
        row = dict.fromkeys(CSV_FIELDS, "")
        row.update(op=case.op, mode=case.mode, shape=case.shape.label, dims=case.shape.dims, provider=provider)
        row.update(dtype=str(problem.dtype).removeprefix("torch."), reps=reps, note=notes.get(provider, ""))
        if provider in times:
            p50, p20, p80 = measure.quantiles(times[provider])
            row.update(p50_ms=round(p50 * 1e3, 5), p20_ms=round(p20 * 1e3, 5), p80_ms=round(p80 * 1e3, 5))
            if flops is not None:
                row["tflops"] = round(flops / p50 / 1e12, 5)
            gbps = case.min_bytes(act_bytes, 4) / p50 / 1e9
            row["gbps"] = round(gbps, 4)
            if memory_bound and peak_bandwidth:
                row["frac_of_peak"] = round(gbps * 1e9 / peak_bandwidth, 4)
            elif not memory_bound and peak_flops:
                row["frac_of_peak"] = round(flops / p50 / peak_flops, 4)
            alloc, peak = memory[provider]
            row.update(alloc_bytes="" if alloc is None else alloc, peak_bytes=peak)
            row["saved_bytes"] = saved.get(provider, "")
            row["speedup_vs_peft"] = round(peft_p50 / p50, 4) if peft_p50 else ""
            if peft_p50:
                row["ratio_vs_peft"] = round(measure.paired_ratio(times["peft"], times[provider]), 4)
            row["max_rel_err"] = f"{errors[provider]:.2e}" if provider in errors else ""
        rows.append(row)
    return rows


def run(
    device: torch.device,
    size: str = "quick",
    ops=OPS,
    modes=None,
    providers=PROVIDERS,
    reps: int = 10,
    warmup: int = 2,
    progress: bool = True,
    on_rows=None,
) -> list[dict]:
    """Every selected case on ``device``; rows stamped with ``measure.run_metadata``. ``on_rows(rows)`` is called
    after each case (the CSV is written as the run goes, so a run stopped by a time limit keeps its rows)."""
    cases = select_cases(device.type, size, ops, modes)
    # bitsandbytes warns on every CPU int8 matmul that it casts fp32 inputs to fp16 (the peft int8 rows).
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    metadata = measure.run_metadata(device)
    try:
        from tqdm.auto import tqdm

        iterator = tqdm(cases, desc="peft-kernels bench", unit="case", disable=not progress, file=sys.stderr)
    except ImportError:
        iterator = cases
    rows = []
    for case in iterator:
        if hasattr(iterator, "set_postfix_str"):
            iterator.set_postfix_str(case.label[:60])
        case_rows = [{**row, **metadata} for row in bench_case(case, device, providers, reps, warmup)]
        rows += case_rows
        if on_rows is not None:
            on_rows(case_rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------ report
def _memory_bound(row: dict) -> bool:
    """Copy-shaped ops and decode-sized linears are judged by GB/s, the rest by TFLOP/s."""
    if row["tflops"] == "":
        return True
    tokens = int(row["dims"].split()[0].removeprefix("M="))
    return tokens <= DECODE_TOKENS_MAX


def vs_peft(row: dict):
    """The row's ratio to PEFT (> 1: faster): the median of paired per-round ratios, else the ratio of p50s; ""
    where there is none. What the README's "vs PEFT" column shows."""
    value = row.get("ratio_vs_peft", "")
    return float(value) if value != "" else (float(row["speedup_vs_peft"]) if row["speedup_vs_peft"] != "" else "")


def _cell(row: dict) -> str:
    if not row["p50_ms"] and row["p50_ms"] != 0:
        return row["note"][:70]
    rate = f"{row['tflops']:.3f} TFLOP/s" if not _memory_bound(row) else f"{row['gbps']:.2f} GB/s"
    peak = f"{row['peak_bytes'] / 1e6:.2f} MB"
    alloc = f"{row['alloc_bytes'] / 1e6:.2f} MB" if row["alloc_bytes"] != "" else "-"
    saved = f"{row['saved_bytes'] / 1e6:.2f} MB" if row["saved_bytes"] != "" else "-"
    ratio = vs_peft(row)
    speedup = f"{ratio:.2f}x" if ratio != "" else "-"
    return (
        f"{row['p50_ms']:10.3f} [{row['p20_ms']:.3f}, {row['p80_ms']:.3f}] {rate:>16} {alloc:>10} {peak:>10}"
        f" {saved:>10} {speedup:>7} {row['max_rel_err'] or '-':>8}"
    )


def print_table(rows: list[dict], file=None) -> None:
    file = file or sys.stdout
    print(
        f"{'case':<52} {'provider':<18} {'ms p50 [p20, p80]':>28} {'rate':>16} {'allocated':>10} {'peak':>10}"
        f" {'saved':>10} {'vs peft':>7} {'rel err':>8}",
        file=file,
    )
    last = None
    for row in rows:
        case = f"{row['op']} {row['mode']} {row['shape']}"
        print(f"{case if case != last else '':<52} {row['provider']:<18} {_cell(row)}", file=file)
        last = case


def append_csv(rows: list[dict], path: str) -> None:
    measure.append_rows(path, rows, list(CSV_FIELDS))


def plot(rows: list[dict], path: str) -> bool:
    """PNG of the ratio to PEFT (``vs_peft``) per case, one panel per op; False when no row has one. The ceiling
    provider is left out: it computes the base GEMM alone, not a LoRA layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rated = [r for r in rows if vs_peft(r) != "" and r["provider"] not in ("peft", CEILING_PROVIDER)]
    if not rated:
        return False
    ops = list(dict.fromkeys(r["op"] for r in rated))
    widest = max(len({(r["mode"], r["shape"]) for r in rated if r["op"] == op}) for op in ops)
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(8.0, 0.6 * widest + 2), 4.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        op_rows = [r for r in rated if r["op"] == op]
        cases = list(dict.fromkeys(f"{r['mode']} {r['shape']}" for r in op_rows))
        providers = list(dict.fromkeys(r["provider"] for r in op_rows))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            values = {f"{r['mode']} {r['shape']}": vs_peft(r) for r in op_rows if r["provider"] == provider}
            xs = [j + i * width for j, case in enumerate(cases) if case in values]
            ax.bar(xs, [values[c] for c in cases if c in values], width, label=provider)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(cases))], cases, fontsize=7)
        plt.setp(ax.get_xticklabels(), rotation=35, ha="right", rotation_mode="anchor")
        ax.set_ylabel("vs PEFT\n(median of per-round PEFT / ours)")
        ax.set_title(f"{op} — {rows[0]['device']}, torch {rows[0]['torch']}, peft {rows[0]['peft']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _csv_list(value: str, allowed, what: str, parser) -> tuple[str, ...]:
    items = tuple(v for v in value.split(",") if v)
    bad = [v for v in items if v not in allowed]
    if bad:
        parser.error(f"unknown {what} {bad}; expected some of {list(allowed)}")
    return items


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["dispatch"]:  # peft-kernels bench dispatch: the per-call cost of the op route (dispatch.py)
        from .dispatch import main as dispatch_main

        return dispatch_main(argv[1:])
    parser = argparse.ArgumentParser(prog="peft-kernels bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--size", default="quick", choices=("tiny", "quick", "full"))
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--modes", default=None, help="comma-separated subset of the modes (default: all)")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="append CSV rows to this file (header when new)")
    parser.add_argument("--plot", default="peft_kernels_bench.png", help="PNG of the speedups ('' to skip)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    ops = _csv_list(args.ops, OPS, "op", parser)
    modes = _csv_list(args.modes, LINEAR_MODES + PREFIX_MODES, "mode", parser) if args.modes else None
    providers = _csv_list(args.providers, PROVIDERS, "provider", parser)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device (torch.cuda.is_available() is False)")
    if args.threads:
        torch.set_num_threads(args.threads)
    on_rows = (lambda rows: append_csv(rows, args.out)) if args.out else None
    rows = run(device, args.size, ops, modes, providers, args.reps, args.warmup, not args.no_progress, on_rows)
    meta = rows[0] if rows else measure.run_metadata(device)
    print(
        f"device: {meta['device']}; torch {meta['torch']}; triton {meta['triton']}; peft {meta['peft']};"
        f" peft_kernels {meta['peft_kernels']} ({meta['git_sha']}); {args.reps} reps, medians [p20, p80]"
    )
    print_table(rows)
    if args.out:
        print(f"wrote {len(rows)} rows to {args.out}")
    if args.plot and rows:
        if plot(rows, args.plot):
            print(f"wrote {args.plot}")
        else:
            print("no plot: no provider has a ratio against peft (is peft installed?)")
    return 0


__all__ = [
    "CSV_FIELDS",
    "TRAINING_MODES",
    "bench_case",
    "flat_output",
    "main",
    "mode_fn",
    "plot",
    "print_table",
    "run",
    "saved_bytes",
]
