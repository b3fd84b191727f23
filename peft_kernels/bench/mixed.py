"""The ``lora_linear_mixed`` rows of ``peft-kernels bench``: one LoRA layer serving a batch mixed over 8 adapters.

Each sample of x (B, T, K) takes adapter ``i % n`` (round robin: neighbouring rows differ, the worst case for a
tiled kernel), as a serving batch of interleaved requests; M = B·T tokens, T = 1 (decode) for M <= 64, else
T = 32 (prefill segments). Providers run the layer's forward with ``adapter_names=``:

    peft        peft 0.21.2's ``lora.Linear._mixed_batch_forward`` (a sub-batch gather and two GEMMs per adapter)
    reference   peft_kernels' ``lora.Linear`` → ``ops.lora_linear_mixed`` pinned to the reference backend
    triton      the same, pinned to the Triton kernels (GPU)

A case with ``adapters=1`` is the single-adapter forward of the same batch (``layer(x)``, no adapter_names):
the yardstick for "a mixed batch costs about what one adapter costs" (issue target: within 1.2x on a GPU).

FLOPs and bytes: each row runs one adapter, so FLOPs are those of ``lora_linear`` (2MNK + 2Mr(K+N)); the minimal
bytes read every adapter once, n·r(K+N) (``cases.Case.min_bytes``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch
from torch import nn

from .cases import BERT_BASE, LLAMA3_8B, Case, LinearShape
from .providers import BACKEND_PROVIDERS, CEILING_PROVIDER, Problem, Unavailable, _OneLinear, _randn, _require_peft

ADAPTERS = 8
TOKENS = (8, 64, 512)
DECODE_MAX_TOKENS = 64
PREFILL_SEGMENT = 32


@dataclasses.dataclass(frozen=True)
class MixedShape(LinearShape):
    adapters: int = ADAPTERS

    @property
    def label(self) -> str:
        what = f"{self.adapters} adapters mixed" if self.adapters > 1 else "1 adapter (single-adapter forward)"
        return f"{self.model} {self.proj} M={self.M} r={self.r} {what}"

    @property
    def dims(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} r={self.r} adapters={self.adapters}"


def mixed_cases(device_type: str, size: str) -> list[Case]:
    """8 adapters at M ∈ {8, 64, 512} (llama3-8b q_proj on a GPU, bert-base query on a CPU), each next to the
    single-adapter forward of the same batch; ``tiny``: two small shapes for the smoke tests."""
    if size == "tiny":
        shapes = [MixedShape("tiny", "lin", m, 96, 80, 4, adapters=n) for m in (8, 64) for n in (3, 1)]
    else:
        model, proj, (k, n) = ("llama3-8b", "q_proj", LLAMA3_8B["q_proj"])
        if device_type != "cuda":
            model, proj, (k, n) = ("bert-base", "query", BERT_BASE["query"])
        shapes = [MixedShape(model, proj, m, k, n, 16, adapters=a) for m in TOKENS for a in (ADAPTERS, 1)]
    return [Case("lora_linear_mixed", "no-grad-fwd", s) for s in shapes]


class MixedProblem(Problem):
    """x (B, T, K) in bf16 (CUDA) / fp32 (CPU), W (N, K) and bias of that dtype, n adapters A_i (r, K),
    B_i (N, r) in fp32 (PEFT's autocast_adapter_dtype), scaling 2; the same tensors in every provider's layer."""

    def __init__(self, case: Case, device: torch.device):
        s: MixedShape = case.shape
        self.case, self.device = case, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        gen = torch.Generator().manual_seed(0)
        self.weight = _randn((s.N, s.K), gen, device, self.dtype, s.K**-0.5)
        self.bias = _randn((s.N,), gen, device, self.dtype, 0.1)
        self.lora_a = [_randn((s.r, s.K), gen, device, torch.float32, s.K**-0.5) for _ in range(s.adapters)]
        self.lora_b = [_randn((s.N, s.r), gen, device, torch.float32, 0.1) for _ in range(s.adapters)]
        tokens = 1 if s.M <= DECODE_MAX_TOKENS else PREFILL_SEGMENT
        self.x = _randn((s.M // tokens, tokens, s.K), gen, device, self.dtype)
        self.names = [f"a{i % s.adapters}" for i in range(self.x.shape[0])]
        self.inputs, self.frozen = [], [self.weight, self.bias]
        self._layers = {}

    def forward(self, provider: str) -> Callable[[], object]:
        if provider == CEILING_PROVIDER:
            return lambda: torch.nn.functional.linear(self.x, self.weight, self.bias)
        if provider == "peft":
            _require_peft()
            import peft as lib
        elif provider in BACKEND_PROVIDERS:
            import peft_kernels as lib
        else:
            raise Unavailable(f"{provider} is not benchmarked on mixed batches")
        layer = self._layer(lib)
        if self.case.shape.adapters == 1:
            return lambda: layer(self.x)
        return lambda: layer(self.x, adapter_names=self.names)

    def _layer(self, lib) -> nn.Module:
        """``lib``'s LoRA layer over this problem's base weight, with adapters a0..a{n-1} set to its A_i and B_i."""
        if lib.__name__ in self._layers:
            return self._layers[lib.__name__]
        s = self.case.shape
        lin = nn.Linear(s.K, s.N, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            lin.bias.copy_(self.bias)
        config = lib.LoraConfig(r=s.r, lora_alpha=2 * s.r, target_modules=["lin"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(_OneLinear(lin), config, adapter_name="a0")
            for i in range(1, s.adapters):
                model.add_adapter(f"a{i}", config)
        layer = model.base_model.model.lin
        with torch.no_grad():
            for i, (a, b) in enumerate(zip(self.lora_a, self.lora_b)):
                layer.lora_A[f"a{i}"].weight.copy_(a)
                layer.lora_B[f"a{i}"].weight.copy_(b)
        layer.eval().requires_grad_(False)
        self._layers[lib.__name__] = layer
        return layer
