"""The Triton backend: the only package of peft_kernels that imports ``triton``.

Available when triton imports and either a CUDA device is visible or ``TRITON_INTERPRET=1`` is set (then it
runs on CPU tensors, for tests, and only when forced with ``backend="triton"``).
"""

from __future__ import annotations

import functools
import os

# op name -> module under backends/triton/ that defines a function of the same name (and the capability check)
IMPLEMENTATIONS = {
    "lora_linear_fwd": "lora",
    "lora_linear_bwd": "lora",
    "prefix_kv_fill": "prefix",
    "kv_append": "prefix",
    "prefix_kv_fill_bwd": "prefix",
    "lora_linear_mixed": "lora_mixed",
    "lora_linear_4bit_fwd": "lora_4bit",
    "lora_linear_4bit_bwd": "lora_4bit",
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def unavailable_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if interpreting():
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False); set TRITON_INTERPRET=1 to run on CPU"
    return None
