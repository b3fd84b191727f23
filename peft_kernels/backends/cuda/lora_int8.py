"""CUDA C++ decode GEMV on an int8 weight (W8A16, csrc/lora_int8.cu) in the argument order of the
``lora_linear_int8_fwd`` alias: ``lora.py``'s ``lora_linear_fwd`` with ``weight_scale`` given.

y = (x·CBᵀ)⊙scale + b + s·(x·Aᵀ·Bᵀ + b_B), the int8 rows streamed once and converted in registers. No backward
kernel: the backward runs on Triton or the reference.
"""

from __future__ import annotations

from . import lora


def not_supported_reasons(op_name: str, *args) -> list[str]:
    """``lora.not_supported_reasons`` for a call in the alias's argument order (x, weight_int8, weight_scale, …)."""
    if op_name != "lora_linear_int8_fwd":
        return [f"no CUDA C++ kernel for {op_name}"]
    return lora.not_supported_reasons("lora_linear_fwd", *_as_lora_args(*args))


def _as_lora_args(x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds):
    return x, weight_int8, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds, weight_scale


def lora_linear_int8_fwd(x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias, scaling, dropout_p, seeds):
    """y = (x·weight_int8ᵀ)⊙weight_scale + b + s·(x·Aᵀ·Bᵀ + b_B); returns (y, [S]) like the reference.

    Conditions (``not_supported_reasons``): M <= 16, K % 16 == 0, fp16/bf16 x, int8 rows dense and 16-byte
    aligned, <= 1 adapter, p = 0.
    """
    return lora.lora_linear_fwd(*_as_lora_args(x, weight_int8, weight_scale, bias, lora_a, lora_b, lora_b_bias,
                                               scaling, dropout_p, seeds))  # fmt: skip
