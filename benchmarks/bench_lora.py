"""GPU benchmark of one LoRA'd linear: peft 0.21.2 vs peft_kernels (reference, Triton) and two baselines.

    python benchmarks/bench_lora.py --out benchmarks/results/<gpu>.csv     # needs a CUDA GPU
    python benchmarks/bench_lora.py --dry-run                               # prints the plan, no GPU needed
    python benchmarks/bench_lora.py --quick --out /tmp/smoke.csv            # one shape, a few seconds

Providers (KERNELS.md §12):
    peft               real peft 0.21.2 ``lora.Linear`` (from get_peft_model), eager; fp32 adapters by default,
                       as PEFT's autocast_adapter_dtype=True places them on a bf16 model
    reference          ``peft_kernels.ops.lora_linear`` with both registered ops pinned to the reference backend
    reference+compile  the reference formula in plain torch (F.linear + dropout + two mm), ``torch.compile``d
    unsloth-style      cuBLAS x·Aᵀ then ``addmm_`` of (x·Aᵀ)·Bᵀ into y (Unsloth's ``matmul_lora``), adapters cast to
                       the activation dtype, hand-written backward; p = 0 only (Unsloth has no dropout fast path)
    triton             ``peft_kernels.ops.lora_linear`` with both ops pinned to the Triton backend
Modes: fwd (forward, graph recorded), bwd (backward of one recorded forward, retain_graph), full (fwd + bwd),
no-grad-fwd (inference: no_grad, dropout off).
Timing: ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` after one untimed call (autotune, compile).
Memory: bytes saved for backward per layer (``saved_tensors_hooks``, unique storages, parameters excluded) and
peak allocation of one call above what was allocated before it.
CSV columns: see ``CSV_FIELDS``; speedup_vs_peft = peft p50 / provider p50 (> 1: faster than PEFT).
Numbers come only from runs on the GPU named in each row; nothing is estimated or filled in.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import os
import subprocess
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

PROVIDERS = ("peft", "reference", "reference+compile", "unsloth-style", "triton")
MODES = ("fwd", "bwd", "full", "no-grad-fwd")
QUANTILES = [0.5, 0.2, 0.8]
CSV_FIELDS = (
    "op", "provider", "mode", "shape", "M", "K", "N", "r", "p", "dtype", "adapter_dtype",
    "p50_ms", "p20_ms", "p80_ms", "tflops", "speedup_vs_peft", "saved_bytes", "peak_bytes",
    "gpu", "torch", "triton", "peft_kernels", "git_sha", "timestamp", "note",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    M: int
    K: int
    N: int
    r: int
    p: float
    modes: tuple[str, ...] = MODES


def _shapes(quick: bool) -> list[Shape]:
    # Inference has no dropout, so p > 0 rows skip no-grad-fwd (it would repeat the p = 0 row).
    dropout_modes = ("fwd", "bwd", "full")
    train = [
        Shape("llama-q 8192x4096x4096", 8192, 4096, 4096, 16, 0.0),
        Shape("llama-q 8192x4096x4096", 8192, 4096, 4096, 16, 0.1, dropout_modes),
    ]
    if quick:
        return train[:1]
    # Llama-3-8B projections (hidden 4096, 8 KV heads of 128 -> k/v 1024, MLP 14336), 8192 tokens, r = 16.
    train += [
        Shape("llama3-8b k/v 8192x4096x1024", 8192, 4096, 1024, 16, 0.0),
        Shape("llama3-8b gate/up 8192x4096x14336", 8192, 4096, 14336, 16, 0.0),
        Shape("llama3-8b down 8192x14336x4096", 8192, 14336, 4096, 16, 0.0),
        Shape("llama3-8b gate/up 8192x4096x14336", 8192, 4096, 14336, 16, 0.1, dropout_modes),
    ]
    decode = [Shape(f"decode {m}x4096x4096", m, 4096, 4096, 16, 0.0, ("no-grad-fwd",)) for m in (1, 16)]
    return train + decode


def _flops(mode: str, s: Shape) -> float:
    """Base 2MNK per GEMM; LoRA forward 2Mr(K+N), backward 4Mr(K+N) (dS, dB, dA, dx-term); dW never."""
    fwd = 2 * s.M * s.N * s.K + 2 * s.M * s.r * (s.K + s.N)
    bwd = 2 * s.M * s.N * s.K + 4 * s.M * s.r * (s.K + s.N)
    return {"fwd": fwd, "no-grad-fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


# ---- providers -------------------------------------------------------------------------------------------------


class _OneLinear(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.lin = nn.Linear(k, n)

    def forward(self, x):
        return self.lin(x)


def build_peft_layer(s: Shape, dtype, adapter_dtype, device):
    """peft 0.21.2's lora.Linear around a frozen nn.Linear, nonzero B (init_lora_weights=False)."""
    import peft

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(
            _OneLinear(s.K, s.N).to(device=device, dtype=dtype),
            peft.LoraConfig(
                r=s.r, lora_alpha=2 * s.r, lora_dropout=s.p, target_modules=["lin"], init_lora_weights=False
            ),
        )
    layer = model.base_model.model.lin
    for name in ("lora_A", "lora_B"):
        getattr(layer, name)["default"].to(adapter_dtype)
    layer.train()
    return layer


def _tensors(layer):
    return {
        "weight": layer.base_layer.weight,
        "bias": layer.base_layer.bias,
        "lora_a": layer.lora_A["default"].weight,
        "lora_b": layer.lora_B["default"].weight,
        "scaling": layer.scaling["default"],
    }


@contextlib.contextmanager
def _pinned(backend: str):
    """Both LoRA ops on ``backend`` for the block. ``backend=`` of ops.lora_linear only reaches the forward (a
    ContextVar, invisible to autograd's CUDA thread), so the priority lists are pinned instead."""
    from peft_kernels.ops import _dispatch

    saved = {op: _dispatch.PRIORITY[op] for op in ("lora_linear_fwd", "lora_linear_bwd")}
    try:
        for op in saved:
            _dispatch.PRIORITY[op] = (backend,)
        yield
    finally:
        _dispatch.PRIORITY.update(saved)


class _UnslothStyleLoRA(torch.autograd.Function):
    """y = x·Wᵀ + b, then y.addmm_(x·Aᵀ, Bᵀ, alpha=s) (cuBLAS), adapters in x's dtype; backward by hand:
    dx = dY·W + s·(dY·B)·A,  dA = s·(dY·B)ᵀ·x,  dB = s·dYᵀ·(x·Aᵀ)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        y = F.linear(x, weight, bias)
        xa = x @ a.t()
        y.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, a, b, xa)
        ctx.scaling, ctx.adapter_dtype = scaling, lora_a.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, a, b, xa = ctx.saved_tensors
        s = ctx.scaling
        dyb = dy @ b  # [M, r]
        dx = dy @ weight
        dx.addmm_(dyb, a, alpha=s)
        d_a = (dyb.t() @ x).mul_(s).to(ctx.adapter_dtype)
        d_b = (dy.t() @ xa).mul_(s).to(ctx.adapter_dtype)
        return dx, None, None, d_a, d_b, None


def _reference_math(x, weight, bias, lora_a, lora_b, scaling, p: float, training: bool):
    """The reference formula in plain torch ops, for torch.compile (PEFT's placement: LoRA in the adapter dtype)."""
    y = F.linear(x, weight, bias)
    x_hat = F.dropout(x.to(lora_a.dtype), p, training) if p > 0 else x.to(lora_a.dtype)
    return (y + scaling * ((x_hat @ lora_a.t()) @ lora_b.t())).to(x.dtype)


_COMPILED = []


def _compiled_reference_math():
    """One torch.compile'd function for the whole run (a new one per cell would recompile from scratch)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_reference_math))
    return _COMPILED[0]


def make_forward(provider: str, layer, s: Shape, training: bool):
    """A callable x -> y for ``provider``, or raises NotImplementedError with the reason it cannot run."""
    from peft_kernels import ops

    t = _tensors(layer)
    p = s.p if training else 0.0
    if provider == "peft":
        layer.train(training)
        return layer
    if provider in ("reference", "triton"):
        from peft_kernels.ops import _dispatch

        probe = (torch.empty(1, s.K, device=t["weight"].device, dtype=t["weight"].dtype),)
        seeds = torch.zeros(1, dtype=torch.int64, device=t["weight"].device) if p > 0 else None
        reasons = _dispatch.call_reasons(
            provider, "lora_linear_fwd", *probe, t["weight"], t["bias"], [t["lora_a"]], [t["lora_b"]], [None],
            [t["scaling"]], [p], seeds,
        )  # fmt: skip
        if reasons:
            raise NotImplementedError("; ".join(reasons))

        # measure() pins both ops to this backend around the whole measurement (forward and backward).
        return lambda x: ops.lora_linear(
            x, t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scaling"], p, training=training
        )
    if provider == "reference+compile":
        compiled = _compiled_reference_math()
        return lambda x: compiled(x, t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scaling"], p, training)
    if provider == "unsloth-style":
        if p > 0:
            raise NotImplementedError("no dropout fast path (Unsloth falls back to PEFT when lora_dropout != 0)")
        return lambda x: _UnslothStyleLoRA.apply(x, t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scaling"])
    raise ValueError(provider)


# ---- measurement -----------------------------------------------------------------------------------------------


def saved_activation_bytes(fwd, x, params) -> int:
    """Bytes of unique non-parameter storages autograd saves during one forward (what backward keeps alive)."""
    param_ptrs = {q.untyped_storage().data_ptr() for q in params}
    storages = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            storages[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = fwd(x)
    del y
    return sum(storages.values())


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(provider: str, mode: str, s: Shape, layer, x, dy):
    """(p50, p20, p80 in ms, saved bytes or None, peak bytes) of one provider/mode."""
    pin = _pinned(provider) if provider in ("reference", "triton") else contextlib.nullcontext()
    with pin:
        return _measure(provider, mode, s, layer, x, dy)


def _measure(provider, mode, s, layer, x, dy):
    import triton.testing

    training = mode != "no-grad-fwd"
    fwd = make_forward(provider, layer, s, training)
    params = list(layer.parameters())
    grads = [x, *(q for q in params if q.requires_grad)]
    saved = None
    if mode == "no-grad-fwd":

        def fn():
            with torch.no_grad():
                fwd(x)
    elif mode == "fwd":

        def fn():
            fwd(x)
    elif mode == "full":

        def fn():
            fwd(x).backward(dy)
    else:  # bwd: one recorded forward, backward replayed
        y = fwd(x)

        def fn():
            y.backward(dy, retain_graph=True)

    fn()  # untimed: autotuning, torch.compile, lazy allocations
    if mode in ("fwd", "full"):
        saved = saved_activation_bytes(fwd, x, params)
    peak = _peak_bytes(fn)
    p50, p20, p80 = triton.testing.do_bench(fn, quantiles=QUANTILES, grad_to_none=grads)
    return p50, p20, p80, saved, peak


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__)
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _plan(shapes, providers, modes):
    for s in shapes:
        for mode in s.modes:
            if mode in modes:
                yield (
                    s,
                    mode,
                    [p for p in providers if not (p == "unsloth-style" and s.p > 0 and mode != "no-grad-fwd")],
                )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="append CSV rows to this file (header written when new)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    parser.add_argument("--quick", action="store_true", help="one training shape only (smoke run)")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--adapter-dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    args = parser.parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    for name in providers:
        if name not in PROVIDERS:
            parser.error(f"unknown provider {name!r}; expected some of {PROVIDERS}")
    for name in modes:
        if name not in MODES:
            parser.error(f"unknown mode {name!r}; expected some of {MODES}")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype, adapter_dtype = dtypes[args.dtype], dtypes[args.adapter_dtype]
    shapes = _shapes(args.quick)

    plan = list(_plan(shapes, providers, modes))
    if args.dry_run:
        print(f"plan: {len(plan)} (shape, mode) cells, x {args.dtype}, adapters {args.adapter_dtype}")
        for s, mode, provs in plan:
            print(
                f"  {s.name:<36} M={s.M:<5} K={s.K:<5} N={s.N:<5} r={s.r:<3} p={s.p:<4} {mode:<12} {','.join(provs)}"
            )
        print(f"out: {args.out or '(stdout only)'}")
        return 0
    if not torch.cuda.is_available():
        print("bench_lora.py needs a CUDA GPU (use --dry-run to print the plan)", file=sys.stderr)
        return 2

    import triton

    import peft_kernels

    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "peft_kernels": peft_kernels.__version__,
        "git_sha": _git_sha(),
    }
    # Rows are appended as each cell finishes, so a run stopped by a time limit keeps what it measured.
    writer, out_file = None, None
    if args.out:
        new = not os.path.exists(args.out)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        out_file = open(args.out, "a", newline="")  # closed at the end of main
        writer = csv.DictWriter(out_file, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
    n_rows = 0
    device = torch.device("cuda")
    for s, mode, provs in plan:
        layer = build_peft_layer(s, dtype, adapter_dtype, device)
        gen = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(s.M, s.K, device=device, dtype=dtype, generator=gen).requires_grad_(mode != "no-grad-fwd")
        dy = torch.randn(s.M, s.N, device=device, dtype=dtype, generator=gen)
        results = {}
        for provider in provs:
            note = ""
            try:
                results[provider] = measure(provider, mode, s, layer, x, dy)
            except NotImplementedError as exc:
                note = f"not run: {exc}"
            except torch.cuda.OutOfMemoryError as exc:
                note = f"OOM: {str(exc).splitlines()[0]}"
            except Exception as exc:  # one provider failing must not lose the others' rows; the error is recorded
                note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            torch.cuda.empty_cache()
            if note:
                results[provider] = note
        peft_p50 = results.get("peft")[0] if isinstance(results.get("peft"), tuple) else None
        for provider, res in results.items():
            row = dict.fromkeys(CSV_FIELDS, "")
            row.update(meta)
            row.update(op="lora_linear", provider=provider, mode=mode, shape=s.name, M=s.M, K=s.K, N=s.N, r=s.r)
            row.update(p=s.p, dtype=args.dtype, adapter_dtype=args.adapter_dtype)
            row["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            if isinstance(res, str):
                row["note"] = res
            else:
                p50, p20, p80, saved, peak = res
                row.update(p50_ms=f"{p50:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}")
                row["tflops"] = f"{_flops(mode, s) / (p50 * 1e-3) / 1e12:.1f}"
                row["speedup_vs_peft"] = f"{peft_p50 / p50:.3f}" if peft_p50 else ""
                row["saved_bytes"] = "" if saved is None else saved
                row["peak_bytes"] = peak
            if writer is not None:
                writer.writerow(row)
                out_file.flush()
            n_rows += 1
            shown = row["note"] or (
                f"p50 {row['p50_ms']} ms [{row['p20_ms']}, {row['p80_ms']}] {row['tflops']} TFLOP/s "
                f"x{row['speedup_vs_peft'] or '-'} vs peft, saved {row['saved_bytes'] or '-'} B, peak {row['peak_bytes']} B"
            )
            print(f"{s.name:<36} p={s.p:<4} {mode:<12} {provider:<18} {shown}", flush=True)
        del layer, x, dy
        torch.cuda.empty_cache()

    if out_file is not None:
        out_file.close()
        print(f"wrote {n_rows} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
