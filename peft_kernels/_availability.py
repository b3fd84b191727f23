"""What can run here, for ``peft-kernels info``: versions, the device, and each backend's availability as the
dispatcher sees it (``ops/_dispatch.py``, the one table; each reason computed once, cached in its package)."""

from __future__ import annotations

import importlib.util
import platform

import torch

from .ops import _dispatch


def _find_spec(name: str):
    """importlib.util.find_spec that treats a broken or blocked package as absent."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def device_summary() -> str:
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{index} {torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); no CUDA device"


def versions() -> dict[str, str]:
    result = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "bitsandbytes", "safetensors", "accelerate", "peft"):
        spec = _find_spec(name)
        if spec is None:
            result[name] = "not installed"
            continue
        try:
            from importlib.metadata import version

            result[name] = version(name)
        except Exception as exc:  # metadata missing for a vendored/editable install
            result[name] = f"installed (version unknown: {exc})"
    result["cuda (torch build)"] = str(torch.version.cuda)
    return result


def backend_report() -> list[tuple[str, str, str]]:
    """(backend, status, reason) for each backend, machine-wide."""
    rows = []
    for name in _dispatch.BACKENDS:
        reason = _dispatch.unavailable_reason(name)
        rows.append((name, "available" if reason is None else "unavailable", reason or ""))
    return rows


def cuda_extension_line() -> str:
    """Whether ``peft_kernels._C`` is built and loaded (importable, matching ABI), apart from having a GPU."""
    from .backends import cuda

    reason = cuda.extension_reason()
    return "built and loaded" if reason is None else reason
