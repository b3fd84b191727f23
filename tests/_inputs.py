"""Named, deliberately awkward input grids and the builders of LoRA test inputs (docs/KERNELS.md §11).

GPU runs take the full lists; the Triton interpreter (numpy on CPU, slow) takes the tiny INTERPRET_* corner.
Odd sizes hit every masked edge: K not a multiple of 16, M below one tile, r below the 16-wide dot minimum.
"""

from __future__ import annotations

import dataclasses

import torch

# Full grids (GPU).
M_GRID = (1, 7, 16, 127, 1000, 4097)
K_GRID = (16, 59, 123, 1024, 4096)
N_GRID = (8, 97, 431, 4096)
RANK_GRID = (1, 8, 16, 17, 64, 128)
LEAD_SHAPES = ((1, 1), (6, 42), (2, 1025))
DROPOUT_GRID = (0.0, 0.1)

# Interpreter corner (every axis still awkward, every size <= 130).
INTERPRET_M = (1, 3, 17, 64)
INTERPRET_KN = (16, 33, 96, 130)
INTERPRET_RANKS = (1, 8, 16, 17)

# Layouts of x / W a case may ask for.
LAYOUTS = ("contiguous", "sliced", "transposed", "conv1d")


@dataclasses.dataclass(frozen=True)
class LoraCase:
    """One LoRA linear problem: x (M, K), W (N, K), A (r, K), B (N, r)."""

    name: str
    M: int
    K: int
    N: int
    r: int
    dtype: torch.dtype = torch.float32
    adapter_dtype: torch.dtype | None = None  # None: same as dtype
    p: float = 0.0
    bias: bool = True
    lora_bias: bool = False
    layout: str = "contiguous"  # x: "sliced" (every other column), "transposed"; W: "conv1d" (a [K, N] tensor's .t())
    scaling: float = 2.0

    @property
    def a_dtype(self) -> torch.dtype:
        return self.adapter_dtype or self.dtype

    def __str__(self) -> str:
        return self.name


# The interpreter sample of the grid M × {K, N} × r × dtype × p × bias × layout: corners first, then a spread.
INTERPRET_CASES = (
    LoraCase("decode-1x16x16-r1-fp32", 1, 16, 16, 1),
    LoraCase("m3-k33-n130-r8-fp32-p0.1", 3, 33, 130, 8, p=0.1),
    LoraCase("m17-k130-n33-r17-fp32-nobias", 17, 130, 33, 17, bias=False),
    LoraCase("m64-k96-n96-r16-bf16-p0.1", 64, 96, 96, 16, torch.bfloat16, p=0.1),
    LoraCase("m17-k33-n96-r8-bf16-fp32adapters", 17, 33, 96, 8, torch.bfloat16, torch.float32, lora_bias=True),
    LoraCase("m64-k130-n16-r1-fp16-p0.1-sliced", 64, 130, 16, 1, torch.float16, p=0.1, layout="sliced"),
    LoraCase("m3-k96-n33-r17-fp16-fp32adapters-p0.1", 3, 96, 33, 17, torch.float16, torch.float32, p=0.1),
    LoraCase("m17-k16-n130-r16-bf16-conv1d", 17, 16, 130, 16, torch.bfloat16, layout="conv1d", bias=False),
    LoraCase("m64-k33-n33-r8-fp32-transposed-p0.1", 64, 33, 33, 8, p=0.1, layout="transposed", lora_bias=True),
    LoraCase("m1-k130-n96-r17-bf16-p0.1", 1, 130, 96, 17, torch.bfloat16, p=0.1),
    LoraCase("m3-k16-n16-r16-fp16", 3, 16, 16, 16, torch.float16),
    LoraCase("m64-k96-n130-r1-bf16-fp32adapters-p0.1", 64, 96, 130, 1, torch.bfloat16, torch.float32, p=0.1),
)

# GPU: realistic and awkward shapes.
GPU_CASES = (
    LoraCase("llama-q-8192x4096x4096-r16-bf16", 8192, 4096, 4096, 16, torch.bfloat16),
    LoraCase("llama-q-4096x4096x4096-r16-bf16-p0.1", 4096, 4096, 4096, 16, torch.bfloat16, p=0.1),
    LoraCase("llama-q-4096-r16-bf16-fp32adapters-p0.1", 4096, 4096, 4096, 16, torch.bfloat16, torch.float32, p=0.1),
    LoraCase("llama-kv-4096x4096x1024-r64-bf16", 4096, 4096, 1024, 64, torch.bfloat16),
    LoraCase("decode-1x4096x4096-r16-bf16", 1, 4096, 4096, 16, torch.bfloat16),
    LoraCase("decode-16x4096x14336-r8-fp16", 16, 4096, 14336, 8, torch.float16),
    LoraCase("m4097-k123-n431-r17-bf16-p0.1", 4097, 123, 431, 17, torch.bfloat16, p=0.1, lora_bias=True),
    LoraCase("m1000-k59-n97-r1-fp32-p0.1", 1000, 59, 97, 1, p=0.1),
    LoraCase("m127-k1024-n8-r128-fp16-sliced", 127, 1024, 8, 128, torch.float16, layout="sliced"),
    LoraCase("m7-k1024-n431-r256-fp32-conv1d", 7, 1024, 431, 256, layout="conv1d"),
)


def make_lora_inputs(case: LoraCase, device="cpu", seed: int = 0) -> dict:
    """Random inputs of ``case`` in its dtypes: x ~ N(0, 1), W and A ~ N(0, 1/K) (unit-scale outputs), B ~ N(0, 1/4)
    (nonzero, unlike PEFT's init, so that the low-rank path is exercised). Layouts are views, never copies."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(device)

    M, K, N, r = case.M, case.K, case.N, case.r
    dtype, a_dtype = case.dtype, case.a_dtype
    # Views are taken after the dtype cast: .to() of a non-dense view would return a contiguous copy.
    if case.layout == "sliced":
        x = randn(M, 2 * K).to(dtype)[:, ::2]
    elif case.layout == "transposed":
        x = randn(K, M).to(dtype).t()
    else:
        x = randn(M, K).to(dtype)
    if case.layout == "conv1d":
        weight = randn(K, N, std=K**-0.5).to(dtype).t()
    else:
        weight = randn(N, K, std=K**-0.5).to(dtype)
    return {
        "x": x,
        "weight": weight,
        "bias": randn(N, std=0.5).to(dtype) if case.bias else None,
        "lora_a": randn(r, K, std=K**-0.5).to(a_dtype),
        "lora_b": randn(N, r, std=0.5).to(a_dtype),
        "lora_b_bias": randn(N, std=0.5).to(a_dtype) if case.lora_bias else None,
        "scaling": case.scaling,
        "p": case.p,
    }


def upcast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t in ``dtype`` (None stays None); the truth side of a comparison, so layout does not matter."""
    return None if t is None else t.detach().to(dtype)
