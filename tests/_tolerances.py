"""The one tolerance table of the test suite. No other file sets atol/rtol.

Kernel rule (flash-attention's): an output is close to the truth when

    max|out - truth| <= 2 * max|eager - truth| + floor * max|truth|

where ``truth`` is the reference upcast (fp64 for fp32 kernels, fp32 for 16-bit ones) and ``eager`` the same
reference run in the kernel's dtype. The factor 2 allows a different (not worse-in-kind) accumulation order;
the floor covers outputs whose eager error is zero by luck (tiny K, exact products).

Contract tolerances compare two implementations of the same math in the same dtype (peft_kernels vs PEFT, or
a model before and after an operation), so they are absolute/relative pairs, each justified below.
"""

from __future__ import annotations

import torch

# floor * max|truth| per kernel dtype (docs/KERNELS.md §11): about 8-10 ulps of the format at unit scale.
KERNEL_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}

# (atol, rtol) for comparing two fp32 computations of the same function that sum in different orders
# (fused addmm_ vs PEFT's separate ops): fp32 eps 1.2e-7 times a few hundred terms of O(1) magnitude.
FP32_SAME_MATH = (1e-5, 1e-5)
# PEFT's own merge/unmerge tests use atol=rtol=1e-4: merging moves ΔW into W and re-rounds every weight.
MERGE = (1e-4, 1e-4)
# bf16/fp16 models compared across implementations: one extra rounding of a 16-bit output (eps 7.8e-3 bf16).
HALF_SAME_MATH = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# Exact equality expected (same ops, same order): disabled adapters vs base, reload vs save.
EXACT = (0.0, 0.0)
# int8 weight-only output against unquantized fp32 weights: signal-to-quantization-noise floor in dB.
# Measured ~41 dB at 4096x4096 and ~44 dB at 123x431 on Gaussian weights (docs/KERNELS.md §6); 35 leaves margin.
INT8_MIN_SQNR_DB = 35.0
# int8 weight format (weight_scale = SCB·(1/127), W = CB·weight_scale, one fp32 multiply) vs bnb's dequant
# (CB·SCB)·(1/127) (two multiplies): both are v·(1+δ1)(1+δ2) with |δ| ≤ 2^-24, so the a-priori bound is a few
# ulps; measured max 1 ulp (≈23% of elements differ) at 4096x4096, 431x123 and 97x59, so the seeded tests pin 1.
INT8_SCALE_FOLD_MAX_ULPS = 1
# LoRA over a bitsandbytes int8 base on CPU, peft_kernels (fp32 activations × dequantized int8 weight) vs PEFT on
# bitsandbytes, whose CPU matmul also rounds the activations to int8 per row (LLM.int8): the difference is int8
# rounding noise of the same kind and size as the weight rounding INT8_MIN_SQNR_DB bounds, so the same floor.
# Measured 44.7 dB on the tiny Whisper's logits (tests/contract/test_vision_speech_diffusion.py).
INT8_VS_BNB_CPU_SQNR_DB = INT8_MIN_SQNR_DB
# int8 merge vs unmerged, compared in softmax space as PEFT's GPU test does (re-quantization error).
INT8_MERGE_SOFTMAX = (1e-3, 1.0)


def truth_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def kernel_error_bound(eager: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> float:
    truth = truth.to(torch.float64)
    eager_err = (eager.to(torch.float64) - truth).abs().max().item() if eager.numel() else 0.0
    scale = truth.abs().max().item() if truth.numel() else 0.0
    return 2.0 * eager_err + KERNEL_FLOOR[dtype] * scale


def assert_close_to_ref(out: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, name=""):
    """The 2x rule above; ``dtype`` is the kernel's compute dtype (selects the floor)."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    err = (out.to(torch.float64) - truth.to(torch.float64)).abs().max().item() if out.numel() else 0.0
    bound = kernel_error_bound(eager, truth, dtype)
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (2x eager error + floor)"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float], name=""):
    atol, rtol = tol
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    """10·log10(‖signal‖² / ‖signal − approx‖²) (torchao's compute_error)."""
    s = signal.to(torch.float64)
    noise = (s - approx.to(torch.float64)).pow(2).sum()
    return float(10.0 * torch.log10(s.pow(2).sum() / noise.clamp_min(1e-300)))


# ---- training-stack integration (tests/integration) ----
# Per-step loss of a 2-process DDP / FSDP1 / FSDP2 run (gloo, fp32) vs one process on the whole batch. Same
# math, different summation order: the gradient is the average of two half-batch means instead of one
# full-batch mean, and that ~1-ulp difference flows into the weights at every SGD step. Measured max 5e-7 on
# the tiny Llama after 3 steps (loss ≈ 4.6, i.e. ~1 ulp); the loss is O(1), so an absolute 1e-5 (20x margin).
DISTRIBUTED_LOSS = (1e-5, 0.0)
# LoRA gradients and logits under CPU bf16 autocast, peft_kernels' fused op vs PEFT's eager layers on the same
# weights: both run the GEMMs in bf16, but the fused backward forms dA/dB from one bf16 product chain while
# autograd rounds each nn.Linear's output and grad separately, so entries differ by a few bf16 ulps (eps 7.8e-3)
# of the tensor's largest entry. Used as max|a - b| <= BF16_AUTOCAST_REL * max|b| (small entries are noise at
# that scale). Measured max 1.2e-2 on the tiny GPT-2/Llama LoRA grads (logits: 0); 4 ulps = 3.2e-2.
BF16_AUTOCAST_REL = 3.2e-2


def assert_close_rel_to_max(actual: torch.Tensor, expected: torch.Tensor, rel: float, name=""):
    """max|actual - expected| <= rel * max|expected| (tolerance scaled by the tensor's magnitude)."""
    err = (actual.double() - expected.double()).abs().max().item()
    bound = rel * expected.double().abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3e} > {rel} x max|expected| = {bound:.3e}"


# ---- benchmarks (benchmarks/test_ops.py, tests/test_bench_suite.py) ----
# A benchmarked provider's output vs the reference backend's on the same inputs (dropout off), as
# max|out - ref| / max|ref|. The providers compute the same formula in another order (a fused kernel, an
# inductor graph, PEFT's separate ops), so the bound is the same-math one of the dtype: fp32 a few hundred eps
# (FP32_SAME_MATH), bf16 two roundings of the output (HALF_SAME_MATH). PEFT over bitsandbytes also rounds the
# activations to int8 (LLM.int8), a different computation: its rows are reported, not bounded.
BENCH_OUTPUT_REL = {torch.float32: FP32_SAME_MATH[1], torch.bfloat16: HALF_SAME_MATH[torch.bfloat16][1]}
# QLoRA merge vs unmerged, in softmax space: merging re-quantizes W + ΔW to 4 bits (NF4/FP4 steps are ~1/8 of a
# block's absmax), so the merged model differs by 4-bit rounding noise, far above INT8_MERGE_SOFTMAX's. Measured
# max 2.0e-3 on the tiny OPT / Llama probabilities (vocab 100, 4-bit in every attention and MLP projection).
QLORA_MERGE_SOFTMAX = (1e-2, 1.0)
# bnb's CPU repack stores each block's absmax as bf16 (rel. error ≤ 2^-9) and its kernel computes in bf16, while
# the LoRA layer reads the same codes and bf16 scales in fp32: outputs of O(1) differ by bf16 rounding (eps 7.8e-3).
QLORA_REPACK = (2e-2, 2e-2)
