"""GPU benchmark of one LoRA'd linear over an int8 weight-only base (W8A16): peft + bitsandbytes vs peft_kernels.

    python benchmarks/bench_lora_int8.py --out benchmarks/results/<gpu>.csv    # needs a CUDA GPU
    python benchmarks/bench_lora_int8.py --dry-run                              # prints the plan, no GPU needed
    python benchmarks/bench_lora_int8.py --quick --out /tmp/smoke.csv           # the GPU suite's subset

Providers (docs/KERNELS.md §12), all on the same int8 weight (bitsandbytes' CB/SCB when bitsandbytes imports, else
the same row-wise absmax quantizer in torch), bias, A and B:
    peft-bnb                real peft 0.21.2 ``lora.bnb.Linear8bitLt`` over ``bnb.nn.Linear8bitLt``
                            (has_fp16_weights=False, threshold ``--bnb-threshold``, default 6.0 as transformers'
                            ``llm_int8_threshold``): LLM.int8 with activation quantization, eager; needs bitsandbytes
    gpt-fast-style          ``F.linear(x, CB.to(dtype)) * scale`` (gpt-fast's ``WeightOnlyInt8Linear``, scale in the
                            activation dtype) + bias + PEFT's LoRA branch in the adapter dtype, eager: the
                            dequantize-to-HBM baseline (a 2NK-byte bf16 weight written and read per call)
    gpt-fast-style+compile  the same function under ``torch.compile`` (gpt-fast's way of fusing the conversion)
    triton                  ``peft_kernels.ops.lora_linear_int8`` with both int8 ops pinned to the Triton backend
    cuda                    the same pinned to the CUDA C++ decode op (forward, M <= 16, p = 0): decode only
    bf16-lora-triton        ``peft_kernels.ops.lora_linear`` on the bf16 weight, pinned to Triton: the reference
                            point of the "int8 within 1.25x of bf16 at training shapes" target (column vs_bf16)
Modes: fwd (forward, graph recorded, dropout on when p > 0), full (fwd + bwd of a fixed random dY; gradients of x,
A, B), decode (no_grad forward, p = 0, M in {1, 16}).
Shapes: training M = 4096, K = N = 4096, r = 16 (p = 0; the full run adds p = 0.1); decode M in {1, 16}
(``--quick``: M = 1 only, and ``+compile`` only at decode, where it matters).

Timing: ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` after one untimed call (autotune, compile);
do_bench clears L2 before every call. Decode: ``peft_kernels.bench.measure.cuda_graph_times`` (one CUDA graph of many
calls, so launch overhead does not count, docs/KERNELS.md §12) over R copies of the weights used in turn, R from
``measure.l2_cold_copies``: the weights read between two uses of one copy exceed 3x the L2 size, so the GB/s are
HBM's, not L2's. peft-bnb with threshold > 0 cannot be captured
(LLM.int8's ``outliers.any()`` and ``argwhere`` synchronize with the host), so it is timed with do_bench, as is
any provider whose capture fails; the ``timer`` column says which.
Bytes (decode): bytes_min = weight (NK int8 + 4N scale, or 2NK bf16) + x (2MK) + y (2MN) + bias (2N) + A and B
(r(K+N) x adapter bytes); gbps = bytes_min / p50; peak_bw_frac = gbps / the GPU's peak (``peft_kernels.bench.measure.DEVICE_PEAKS``; blank on
an unknown GPU unless ``--peak-gbps``). Training: tflops from 2MNK + 2Mr(K+N) (fwd) plus 2MNK + 4Mr(K+N) (bwd).
Memory: peak allocation of one call above what was allocated before it.
Accuracy: rel_err = max|y - truth| / max|truth| of one call (p = 0 rows), truth = the reference op in fp32 on
W_deq (on the bf16 W for bf16-lora-triton).
CSV columns: ``CSV_FIELDS``; vs_bf16 = provider p50 / bf16-lora-triton p50 (<= 1.25 meets the training target);
speedup_vs_peft_bnb = peft-bnb p50 / provider p50. Numbers come only from runs on the GPU named in each row;
nothing is estimated or filled in.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernels.bench import measure as bench_measure
from peft_kernels.bench.providers import pinned

QUANTILES = [0.5, 0.2, 0.8]  # triton.testing.do_bench's median, p20, p80

PROVIDERS = ("peft-bnb", "gpt-fast-style", "gpt-fast-style+compile", "triton", "cuda", "bf16-lora-triton")
MODES = ("fwd", "full", "decode")
CSV_FIELDS = (
    "op", "provider", "mode", "shape", "M", "K", "N", "r", "p", "dtype", "adapter_dtype",
    "p50_ms", "p20_ms", "p80_ms", "timer", "tflops", "bytes_min", "gbps", "peak_bw_frac", "vs_bf16",
    "speedup_vs_peft_bnb", "rel_err", "peak_bytes",
    "gpu", "torch", "triton", "bitsandbytes", "peft_kernels", "git_sha", "timestamp", "note",
)  # fmt: skip
# provider -> (peft_kernels.bench op, backend its ops are pinned to) for the providers that run our ops
_PINS = {"triton": ("lora_linear_int8", "triton"), "cuda": ("lora_linear_int8", "cuda"),
         "bf16-lora-triton": ("lora_linear", "triton")}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    M: int
    K: int
    N: int
    r: int
    p: float
    modes: tuple[str, ...]


def _shapes(quick: bool) -> list[Shape]:
    shapes = [Shape("llama-q 4096x4096x4096", 4096, 4096, 4096, 16, 0.0, ("fwd", "full"))]
    if not quick:
        shapes.append(Shape("llama-q 4096x4096x4096", 4096, 4096, 4096, 16, 0.1, ("fwd", "full")))
    for m in (1,) if quick else (1, 16):
        shapes.append(Shape(f"decode {m}x4096x4096", m, 4096, 4096, 16, 0.0, ("decode",)))
    return shapes


def _plan(shapes, providers, modes, quick):
    """(shape, mode, providers) cells; bf16-lora-triton and triton first (the target ratio), compile last."""
    for s in shapes:
        for mode in s.modes:
            if mode not in modes:
                continue
            provs = [p for p in providers if not (p == "cuda" and mode != "decode")]
            if quick and mode != "decode":
                provs = [p for p in provs if not p.endswith("+compile")]
            yield s, mode, provs


def _flops(mode: str, s: Shape) -> float:
    fwd = 2 * s.M * s.N * s.K + 2 * s.M * s.r * (s.K + s.N)
    bwd = 2 * s.M * s.N * s.K + 4 * s.M * s.r * (s.K + s.N)
    return {"fwd": fwd, "decode": fwd, "full": fwd + bwd}[mode]


def _bytes_min(provider: str, s: Shape, adapter_bytes: int) -> int:
    """Bytes a decode call must move at least: the weight in its stored format, x, y, bias, A and B."""
    weight = 2 * s.N * s.K if provider == "bf16-lora-triton" else s.N * s.K + 4 * s.N
    return weight + 2 * s.M * s.K + 2 * s.M * s.N + 2 * s.N + s.r * (s.K + s.N) * adapter_bytes


def _peak_bandwidth(name: str, override_gbps: float | None) -> float | None:
    """Bytes/s: ``--peak-gbps``, else the one GPU peak table (``peft_kernels.bench.measure.DEVICE_PEAKS``)."""
    if override_gbps:
        return override_gbps * 1e9
    from peft_kernels.bench.measure import device_peaks

    return device_peaks(name)[1]


# ---- weights and providers -------------------------------------------------------------------------------------


def _bnb():
    """bitsandbytes, or the reason it cannot serve (recorded in the peft-bnb rows)."""
    try:
        import bitsandbytes

        return bitsandbytes, None
    except Exception as exc:  # any import failure becomes the provider's note
        return None, f"bitsandbytes not importable ({type(exc).__name__}: {exc})"


@dataclasses.dataclass
class Weights:
    """One copy of the layer: int8 CB (N, K), SCB (N,) fp32, weight_scale = SCB/127, the bf16 weight it came from,
    bias, and the bitsandbytes layer holding CB/SCB (None without bitsandbytes)."""

    cb: torch.Tensor
    scb: torch.Tensor
    weight_scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    bnb_layer: nn.Module | None


def make_weights(s: Shape, dtype, device, threshold: float, seed: int) -> Weights:
    from peft_kernels.formats import bnb_weight_scale

    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(s.N, s.K, generator=gen) / s.K**0.5).to(dtype)
    bias = (torch.randn(s.N, generator=gen) * 0.1).to(dtype)
    bnb, _ = _bnb()
    layer = None
    if bnb is not None:
        layer = bnb.nn.Linear8bitLt(s.K, s.N, bias=True, has_fp16_weights=False, threshold=threshold)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
        layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
        layer = layer.to(device)  # Int8Params quantizes on the move: weight.CB (int8), weight.SCB (fp32)
        cb, scb = layer.weight.CB, layer.weight.SCB
    else:  # the same row-wise absmax quantizer as bitsandbytes' int8_vectorwise_quant
        scb = weight.float().abs().amax(1)
        cb = torch.round(weight.float() * (127.0 / scb)[:, None]).to(torch.int8)
        cb, scb = cb.to(device), scb.to(device)
    return Weights(cb, scb, bnb_weight_scale(scb), weight.to(device), bias.to(device), layer)


class _OneLinear(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin
        self.is_loaded_in_8bit = True  # what transformers sets; PEFT's dispatch_bnb_8bit reads it

    def forward(self, x):
        return self.lin(x)


def build_peft_bnb(w: Weights, s: Shape, lora_a, lora_b):
    """peft 0.21.2's lora.bnb.Linear8bitLt via get_peft_model, adapters set to the shared A and B."""
    import peft

    if w.bnb_layer is None:
        raise NotImplementedError(_bnb()[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(
            _OneLinear(w.bnb_layer),
            peft.LoraConfig(
                r=s.r, lora_alpha=2 * s.r, lora_dropout=s.p, target_modules=["lin"], init_lora_weights=False
            ),
        )
    layer = model.base_model.model.lin
    if type(layer).__module__ != "peft.tuners.lora.bnb":
        raise NotImplementedError(
            f"peft wrapped the bitsandbytes layer as {type(layer).__module__}.{type(layer).__name__}"
        )
    with torch.no_grad():
        layer.lora_A["default"].weight = nn.Parameter(lora_a.clone())
        layer.lora_B["default"].weight = nn.Parameter(lora_b.clone())
    return layer


def _gpt_fast_math(x, cb, scale, bias, lora_a, lora_b, scaling: float, p: float, training: bool):
    """y = F.linear(x, CB.to(dtype)) * scale + b + s·(drop(x)·Aᵀ)·Bᵀ (LoRA in the adapter dtype, as PEFT)."""
    y = F.linear(x, cb.to(x.dtype)) * scale + bias
    x_hat = F.dropout(x.to(lora_a.dtype), p, training) if p > 0 else x.to(lora_a.dtype)
    return (y + scaling * ((x_hat @ lora_a.t()) @ lora_b.t())).to(x.dtype)


_COMPILED = []


def _compiled_gpt_fast():
    """One torch.compile'd function for the whole run (recompiles per shape and grad mode, never per call)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_gpt_fast_math, dynamic=False))
    return _COMPILED[0]


def make_forward(provider: str, w: Weights, s: Shape, lora_a, lora_b, scaling: float, training: bool):
    """A callable x -> y for ``provider`` on weight copy ``w``, or NotImplementedError with the reason."""
    from peft_kernels import ops
    from peft_kernels.ops import _dispatch

    p = s.p if training else 0.0
    if provider == "peft-bnb":
        layer = build_peft_bnb(w, s, lora_a, lora_b)
        layer.train(training)
        return layer
    if provider in ("gpt-fast-style", "gpt-fast-style+compile"):
        fn = _compiled_gpt_fast() if provider.endswith("+compile") else _gpt_fast_math
        scale = w.weight_scale.to(w.weight.dtype)  # gpt-fast keeps the scales in the activation dtype
        return lambda x: fn(x, w.cb, scale, w.bias, lora_a, lora_b, scaling, p, training)
    if provider in ("triton", "cuda"):
        probe = torch.empty(max(1, min(s.M, 16)), s.K, device=w.cb.device, dtype=w.weight.dtype)
        seeds = torch.zeros(1, dtype=torch.int64, device=probe.device) if p > 0 else None
        args = (probe, w.cb, w.weight_scale, w.bias, [lora_a], [lora_b], [None], [scaling], [p], seeds)
        reasons = _dispatch.call_reasons(provider, "lora_linear_int8_fwd", *args)
        if reasons:
            raise NotImplementedError("; ".join(reasons))
        return lambda x: ops.lora_linear_int8(x, w.cb, w.weight_scale, w.bias, lora_a, lora_b, scaling, p, training)
    if provider == "bf16-lora-triton":
        probe = torch.empty(1, s.K, device=w.weight.device, dtype=w.weight.dtype)
        seeds = torch.zeros(1, dtype=torch.int64, device=probe.device) if p > 0 else None
        args = (probe, w.weight, w.bias, [lora_a], [lora_b], [None], [scaling], [p], seeds)
        reasons = _dispatch.call_reasons("triton", "lora_linear_fwd", *args)
        if reasons:
            raise NotImplementedError("; ".join(reasons))
        return lambda x: ops.lora_linear(x, w.weight, w.bias, lora_a, lora_b, scaling, p, training)
    raise ValueError(provider)


# ---- measurement -----------------------------------------------------------------------------------------------


def _truth(provider: str, w: Weights, x, lora_a, lora_b, scaling):
    """The reference forward in fp32 (p = 0) on the weight ``provider`` computes with: W_deq, or the bf16 W."""
    from peft_kernels.backends.reference import lora, lora_int8

    f32 = torch.float32
    adapters = ([lora_a.detach().to(f32)], [lora_b.detach().to(f32)], [None], [scaling], [0.0], None)
    if provider == "bf16-lora-triton":
        return lora.lora_linear_fwd(x.detach().to(f32), w.weight.to(f32), w.bias.to(f32), *adapters)[0]
    return lora_int8.lora_linear_int8_fwd(x.detach().to(f32), w.cb, w.weight_scale, w.bias.to(f32), *adapters)[0]


def _time_decode(fn):
    """(p50, p20, p80, timer) in ms: a CUDA graph of many calls when capturable, else do_bench."""
    import triton.testing

    try:
        seconds = bench_measure.cuda_graph_times(fn, torch.device("cuda"))
        return (*bench_measure.quantiles([t * 1e3 for t in seconds]), "cudagraph")
    except Exception as exc:  # capture refused (host sync, allocation outside the pool): eager timing, noted
        torch.cuda.synchronize()
        reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        return (*triton.testing.do_bench(fn, quantiles=QUANTILES), f"do_bench (capture failed: {reason})")


def measure(provider, mode, s, weight_copies, x, dy, lora_a, lora_b, scaling, bnb_threshold):
    """(p50, p20, p80, timer, peak bytes, rel_err) of one provider/mode."""
    with pinned(*_PINS.get(provider, ("lora_linear_int8", None))):
        return _measure(provider, mode, s, weight_copies, x, dy, lora_a, lora_b, scaling, bnb_threshold)


def _measure(provider, mode, s, weight_copies, x, dy, lora_a, lora_b, scaling, bnb_threshold):
    import triton.testing

    training = mode != "decode"
    copies = weight_copies if mode == "decode" else weight_copies[:1]
    fwds = [make_forward(provider, w, s, lora_a, lora_b, scaling, training) for w in copies]
    grads = [x, lora_a, lora_b] if mode == "full" else None
    rel_err = ""
    with torch.no_grad():
        if s.p == 0.0 or mode == "decode":
            y, truth = fwds[0](x), _truth(provider, copies[0], x, lora_a, lora_b, scaling)
            rel_err = f"{((y.float() - truth).abs().max() / truth.abs().max()).item():.2e}"
    turn = [0]

    def next_fwd():
        f = fwds[turn[0] % len(fwds)]
        turn[0] += 1
        return f

    if mode == "decode":

        def fn():
            with torch.no_grad():
                next_fwd()(x)
    elif mode == "fwd":

        def fn():
            next_fwd()(x)
    else:  # full

        def fn():
            next_fwd()(x).backward(dy)

    fn()  # untimed: autotuning, torch.compile, lazy allocations
    peak = bench_measure.allocations(fn, torch.device("cuda"))[1]
    if mode == "decode" and not (provider == "peft-bnb" and bnb_threshold > 0):
        p50, p20, p80, timer = _time_decode(fn)
    else:
        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=QUANTILES, grad_to_none=grads)
        timer = "do_bench" if mode != "decode" else "do_bench (LLM.int8 threshold > 0 syncs with the host)"
    return p50, p20, p80, timer, peak, rel_err


def _weight_copies(s: Shape, dtype, device, threshold: float, decode: bool) -> list[Weights]:
    """One copy for training shapes; for decode enough copies that 3x the L2 size of int8 weight bytes lies between
    two uses of one copy (so every call reads its weight from HBM), at least 2."""
    if not decode:
        return [make_weights(s, dtype, device, threshold, seed=0)]
    n = bench_measure.l2_cold_copies(s.N * s.K, device)
    return [make_weights(s, dtype, device, threshold, seed=i) for i in range(n)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="append CSV rows to this file (header written when new)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    parser.add_argument("--quick", action="store_true", help="training p = 0 and decode M = 1 only (GPU suite)")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--adapter-dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--bnb-threshold", type=float, default=6.0, help="Linear8bitLt outlier threshold")
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak HBM bandwidth when the GPU is not listed")
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
    # bf16-lora-triton (the target's denominator) and triton first: a run cut short keeps the key ratio.
    order = ("bf16-lora-triton", "triton", "cuda", "gpt-fast-style", "peft-bnb", "gpt-fast-style+compile")
    providers = sorted(providers, key=order.index)
    plan = list(_plan(_shapes(args.quick), providers, modes, args.quick))
    if args.dry_run:
        print(f"plan: {len(plan)} (shape, mode) cells, x {args.dtype}, adapters {args.adapter_dtype}, "
              f"bnb threshold {args.bnb_threshold}")  # fmt: skip
        for s, mode, provs in plan:
            print(f"  {s.name:<26} M={s.M:<5} K={s.K:<5} N={s.N:<5} r={s.r:<3} p={s.p:<4} {mode:<7} {','.join(provs)}")
        print(f"out: {args.out or '(stdout only)'}")
        return 0
    if not torch.cuda.is_available():
        print("bench_lora_int8.py needs a CUDA GPU (use --dry-run to print the plan)", file=sys.stderr)
        return 2

    import triton

    import peft_kernels

    bnb, _ = _bnb()
    gpu = torch.cuda.get_device_name()
    peak_bw = _peak_bandwidth(gpu, args.peak_gbps)
    meta = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bitsandbytes": getattr(bnb, "__version__", "") if bnb is not None else "",
        "peft_kernels": peft_kernels.__version__,
        "git_sha": bench_measure.git_sha(),
    }
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
    adapter_bytes = torch.empty(0, dtype=adapter_dtype).element_size()
    for s, mode, provs in plan:
        copies = _weight_copies(s, dtype, device, args.bnb_threshold, mode == "decode")
        gen = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(s.M, s.K, device=device, dtype=dtype, generator=gen).requires_grad_(mode != "decode")
        dy = torch.randn(s.M, s.N, device=device, dtype=dtype, generator=gen)
        lora_a = (torch.randn(s.r, s.K, device=device, generator=gen) / s.K**0.5).to(adapter_dtype)
        lora_b = (torch.randn(s.N, s.r, device=device, generator=gen) * 0.1).to(adapter_dtype)
        lora_a.requires_grad_(mode != "decode")
        lora_b.requires_grad_(mode != "decode")
        scaling = 2.0  # lora_alpha = 2r, as the peft-bnb layer is configured
        results = {}
        for provider in provs:
            try:
                results[provider] = measure(
                    provider, mode, s, copies, x, dy, lora_a, lora_b, scaling, args.bnb_threshold
                )
            except NotImplementedError as exc:
                results[provider] = f"not run: {exc}"
            except torch.cuda.OutOfMemoryError as exc:
                results[provider] = f"OOM: {str(exc).splitlines()[0]}"
            except Exception as exc:  # one provider failing must not lose the others' rows; the error is recorded
                results[provider] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            torch.cuda.empty_cache()
        p50_of = {k: v[0] for k, v in results.items() if isinstance(v, tuple)}
        for provider, res in results.items():
            row = dict.fromkeys(CSV_FIELDS, "")
            row.update(meta)
            row.update(op="lora_linear_int8", provider=provider, mode=mode, shape=s.name, M=s.M, K=s.K, N=s.N, r=s.r)
            row.update(p=s.p, dtype=args.dtype, adapter_dtype=args.adapter_dtype)
            row["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            if isinstance(res, str):
                row["note"] = res
            else:
                p50, p20, p80, timer, peak, rel_err = res
                row.update(p50_ms=f"{p50:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}", timer=timer)
                row.update(peak_bytes=peak, rel_err=rel_err)
                row["tflops"] = f"{_flops(mode, s) / (p50 * 1e-3) / 1e12:.1f}"
                if mode == "decode":
                    nbytes = _bytes_min(provider, s, adapter_bytes)
                    gbps = nbytes / (p50 * 1e-3) / 1e9
                    row.update(bytes_min=nbytes, gbps=f"{gbps:.0f}")
                    row["peak_bw_frac"] = f"{gbps * 1e9 / peak_bw:.3f}" if peak_bw else ""
                if "bf16-lora-triton" in p50_of:
                    row["vs_bf16"] = f"{p50 / p50_of['bf16-lora-triton']:.3f}"
                if "peft-bnb" in p50_of:
                    row["speedup_vs_peft_bnb"] = f"{p50_of['peft-bnb'] / p50:.3f}"
            if writer is not None:
                writer.writerow(row)
                out_file.flush()
            n_rows += 1
            shown = row["note"] or (
                f"p50 {row['p50_ms']} ms [{row['p20_ms']}, {row['p80_ms']}] {row['timer']}, {row['tflops']} TFLOP/s"
                + (f", {row['gbps']} GB/s ({row['peak_bw_frac'] or '?'} of peak)" if mode == "decode" else "")
                + f", x{row['vs_bf16'] or '-'} of bf16, x{row['speedup_vs_peft_bnb'] or '-'} vs peft-bnb, "
                f"rel_err {row['rel_err'] or '-'}, peak {row['peak_bytes']} B"
            )
            print(f"{s.name:<26} p={s.p:<4} {mode:<7} {provider:<23} {shown}", flush=True)
        del copies, x, dy
        torch.cuda.empty_cache()

    if out_file is not None:
        out_file.close()
        print(f"wrote {n_rows} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
