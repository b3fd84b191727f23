"""The CUDA C++ backend: the only module that imports ``peft_kernels._C``. Never raises at import."""

from __future__ import annotations

import functools
import importlib

# op name -> module under backends/cuda/ that defines a function of the same name
_OP_MODULES: dict[str, str] = {}


@functools.lru_cache(maxsize=None)
def _load_extension():
    """(module, None) or (None, reason). The import itself never touches the CUDA driver."""
    try:
        from peft_kernels import _C  # noqa: F401
    except Exception as exc:
        return None, f"extension peft_kernels._C not built or not loadable ({type(exc).__name__}: {exc})"
    return _C, None


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    ext, reason = _load_extension()
    if reason is not None:
        return reason
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def get_impl(op_name: str):
    module = importlib.import_module(f"{__name__}.{_OP_MODULES[op_name]}")
    return getattr(module, op_name)


def not_supported_reasons(op_name: str, *args) -> list[str]:
    if op_name not in _OP_MODULES:
        return [f"no CUDA C++ kernel for {op_name}"]
    module = importlib.import_module(f"{__name__}.{_OP_MODULES[op_name]}")
    return module.not_supported_reasons(op_name, *args)
