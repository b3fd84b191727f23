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
from .providers import BACKEND_PROVIDERS, LinearProblem, Unavailable, _OneLinear, _quiet_get_peft_model, _require_peft


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
