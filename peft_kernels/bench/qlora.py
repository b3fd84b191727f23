"""The ``lora_linear_4bit`` benchmark problem: LoRA over a bitsandbytes NF4 weight (double-quantized, blocksize
64: what ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``
builds), the same packed weight for every provider.

Providers: ``peft`` = peft 0.21.2's ``lora.bnb.Linear4bit`` over ``bnb.nn.Linear4bit`` (bnb dequantizes the whole
N×K weight per call, forward and backward); ``reference`` / ``triton`` = ``ops.lora_linear_4bit`` pinned to that
backend. ``reference+compile`` and ``cuda`` have no 4-bit formula and say so.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .cases import Case, LinearShape
from .providers import (
    BACKEND_PROVIDERS,
    CEILING_PROVIDER,
    NO_CEILING,
    LinearProblem,
    Unavailable,
    _OneLinear,
    _quiet_get_peft_model,
    _require_peft,
)


class QLoraProblem(LinearProblem):
    """LinearProblem's x, bias, A, B; W quantized once by bitsandbytes' quantize_4bit (nf4, nested, blocksize 64)."""

    def __init__(self, case: Case, device: torch.device):
        super().__init__(case, device)
        try:
            import bitsandbytes.functional as bnb_functional
        except Exception as exc:  # any import failure of bitsandbytes is every provider's reason here
            raise Unavailable(f"bitsandbytes not importable ({type(exc).__name__}: {exc})") from exc
        self.packed, self.quant_state = bnb_functional.quantize_4bit(
            self.weight, blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        del self.weight
        self.frozen = [self.packed, self.bias]

    def forward(self, provider: str) -> Callable[[], object]:
        p = self.case.shape.p
        training = self.case.mode != "no-grad-fwd"
        if provider == CEILING_PROVIDER:
            raise Unavailable(NO_CEILING)
        if provider == "peft":
            layer = self._peft()
            layer.train(training)
            return lambda: layer(self.x)
        if provider in ("reference", "triton"):
            from .. import ops

            return lambda: ops.lora_linear_4bit(
                self.x, self.packed, self.quant_state, self.bias, self.lora_a, self.lora_b, self.scaling, p,
                training=training,
            )  # fmt: skip
        if provider == "cuda":
            raise Unavailable("no CUDA C++ kernel for lora_linear_4bit (the Triton kernels serve CUDA devices)")
        if provider in BACKEND_PROVIDERS or provider == "reference+compile":
            raise Unavailable(f"no {provider} formula for lora_linear_4bit")
        raise ValueError(f"unknown provider {provider!r}")

    def _peft(self):
        if self._peft_layer is not None:
            return self._peft_layer
        _require_peft()
        import bitsandbytes as bnb
        import peft

        s: LinearShape = self.case.shape
        lin = bnb.nn.Linear4bit(s.K, s.N, bias=True, compute_dtype=self.dtype, quant_type="nf4", device="meta")
        lin.weight = bnb.nn.Params4bit(self.packed, requires_grad=False, quant_state=self.quant_state, blocksize=64,
                                       compress_statistics=True, quant_type="nf4", bnb_quantized=True, module=lin)  # fmt: skip
        lin.quant_state = self.quant_state
        # bnb's AVX512-BF16 CPU repack (first no-grad eval forward) needs N % 32 == 0 and rewrites the shared packed
        # weight in place: off, so every provider reads the same standard layout.
        lin.support_avx512bf16_for_cpu = False
        lin.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        base = _OneLinear(lin)
        base.is_loaded_in_4bit = True  # what transformers sets; PEFT's bnb dispatcher reads it
        config = peft.LoraConfig(r=s.r, lora_alpha=2 * s.r, lora_dropout=s.p, target_modules=["lin"])
        layer = _quiet_get_peft_model(base, config).base_model.model.lin
        if type(layer).__name__ != "Linear4bit":
            raise Unavailable(f"peft wrapped the 4-bit layer as {type(layer).__module__}.{type(layer).__name__}")
        layer.lora_A["default"].weight = nn.Parameter(self.lora_a.detach()).requires_grad_()
        layer.lora_B["default"].weight = nn.Parameter(self.lora_b.detach()).requires_grad_()
        self.inputs += [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        self._peft_layer = layer
        return layer


# ------------------------------------------------------------------------------ decode against HBM (GPU only)
DECODE_SHAPE = LinearShape("llama3-8b", "q_proj", 1, 4096, 4096, 16)  # issue #14's decode target


def packed_weight_bytes(s: LinearShape) -> int:
    """Bytes of the 4-bit weight a decode call must read: N·K/2 codes + one uint8 nested scale per 64 elements."""
    return s.N * s.K // 2 + s.N * s.K // 64


def decode_hbm_rows(device: torch.device, providers=("peft", "triton"), shape: LinearShape = DECODE_SHAPE) -> list:
    """Per provider: (provider, p50/p20/p80 µs per call, GB/s of the packed weight, fraction of the GPU's HBM peak,
    timer). One CUDA graph of many no-grad calls (``measure.cuda_graph_times``: launch overhead does not count)
    rotating over ``measure.l2_cold_copies`` copies of the weights, so the bytes come from HBM; eager timing where
    capture fails (the timer column says which). Issue #14's target: triton ≥ 70% of HBM and ≥ 2x peft."""
    import itertools

    from . import measure, mode_fn

    case = Case("lora_linear_4bit", "no-grad-fwd", shape)
    weight_bytes = packed_weight_bytes(shape)
    copies = measure.l2_cold_copies(weight_bytes, device)
    _, peak_bw = measure.device_peaks(measure.device_name(device))
    rows = []
    for provider in providers:
        try:
            problems = [QLoraProblem(case, device) for _ in range(copies)]
            # mode_fn pins the provider's backend and runs under no_grad, as the op rows do.
            calls = itertools.cycle([mode_fn(problem, provider, "no-grad-fwd")[1] for problem in problems])
        except Unavailable as exc:
            rows.append((provider, None, None, None, None, None, f"unavailable: {exc}"))
            continue

        def fn(calls=calls):
            return next(calls)()

        try:
            seconds, timer = measure.cuda_graph_times(fn, device), "cudagraph"
        except Exception as exc:  # capture failed (a host sync): eager timing, labelled
            seconds, timer = [measure.time_once(fn, device) for _ in range(50)], f"eager ({type(exc).__name__})"
        p50, p20, p80 = measure.quantiles(seconds)
        gbps = weight_bytes / p50 / 1e9
        rows.append(
            (provider, p50 * 1e6, p20 * 1e6, p80 * 1e6, gbps, gbps * 1e9 / peak_bw if peak_bw else None, timer)
        )
    return rows


def main(argv=None) -> int:
    """``python -m peft_kernels.bench.qlora [--out CSV]``: the decode HBM rows on the CUDA device."""
    import argparse
    import csv

    parser = argparse.ArgumentParser(description=decode_hbm_rows.__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode HBM rows need a CUDA device (torch.cuda.is_available() is False)")
        return 1
    device = torch.device("cuda")
    rows = decode_hbm_rows(device)
    fields = ("provider", "p50_us", "p20_us", "p80_us", "packed_weight_gbps", "hbm_fraction", "timer")
    base = next((r[1] for r in rows if r[0] == "peft" and r[1]), None)
    print(f"{torch.cuda.get_device_name(device)}: lora_linear_4bit decode M=1 K=N=4096 r=16 bf16 (NF4 nested)")
    for row in rows:
        vs = f"{base / row[1]:.2f}x vs peft" if base and row[1] else ""
        print("  " + "  ".join("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v) for v in row), vs)
    if args.out:
        with open(args.out, "a", newline="") as f:
            writer = csv.writer(f)
            if f.tell() == 0:
                writer.writerow(("device", *fields))
            writer.writerows((torch.cuda.get_device_name(device), *row) for row in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
