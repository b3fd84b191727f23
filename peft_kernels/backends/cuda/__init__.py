"""The CUDA C++ backend: the only module that imports ``peft_kernels._C``. Never raises at import.

Availability is decided once and cached, in this order (the first failure is the backend's reason, logged once):
1. ``peft_kernels._C`` imports (not built, built for another Python, missing symbols: the ImportError text);
2. its ``ABI_VERSION`` matches ``_launch.ABI_VERSION`` (a stale build has other launcher signatures);
3. torch sees a CUDA device;
4. ``_C.runtime_check()`` finds a driver new enough for the build's CUDA runtime and a device (the only CUDA
   call made outside a launch; importing ``_C`` makes none).
Per-call limits (shape, dtype, alignment, compute capability) are each module's ``not_supported_reasons``.
"""

from __future__ import annotations

import functools
import logging

from ._launch import ABI_VERSION

logger = logging.getLogger("peft_kernels")

# op name -> module under backends/cuda/ that defines a function of the same name (and the capability check)
IMPLEMENTATIONS = {
    "lora_linear_fwd": "lora",
    "prefix_kv_fill": "prefix",
    "kv_append": "prefix",
    "prefix_kv_fill_bwd": "prefix",
}


@functools.cache
def _load_extension():
    """(module, None) or (None, reason). The import itself never touches the CUDA driver."""
    try:
        from peft_kernels import _C
    except Exception as exc:
        return None, f"extension peft_kernels._C not built or not loadable ({type(exc).__name__}: {exc})"
    abi = getattr(_C, "ABI_VERSION", None)
    if abi != ABI_VERSION:
        return None, f"extension peft_kernels._C is a stale build (ABI {abi}, expected {ABI_VERSION}); rebuild it"
    return _C, None


def extension():
    """The loaded ``peft_kernels._C`` module; only called once ``unavailable_reason()`` is None."""
    ext, reason = _load_extension()
    if ext is None:
        raise RuntimeError(reason)
    return ext


def extension_reason() -> str | None:
    """Why ``_C`` cannot be imported (None when it can), without asking for a GPU: build checks and tests."""
    return _load_extension()[1]


@functools.cache
def unavailable_reason() -> str | None:
    reason = _unavailable_reason()
    if reason is not None:
        logger.info("peft_kernels: CUDA C++ backend unavailable: %s", reason)
    return reason


def _unavailable_reason() -> str | None:
    ext, reason = _load_extension()
    if reason is not None:
        return reason
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    try:
        problem = ext.runtime_check()
    except Exception as exc:  # a broken runtime is a reason, never a crash at dispatch
        return f"peft_kernels._C.runtime_check() failed ({type(exc).__name__}: {exc})"
    return problem or None
