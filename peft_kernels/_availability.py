"""What can run here: one place that answers for ``peft-kernels info`` and the dispatcher.

Each backend's reason is computed once (cached in its package) and logged once at INFO level on first use.
"""

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


def has_triton() -> bool:
    return _find_spec("triton") is not None


def cuda_ext_status() -> str:
    """'loaded' or the reason the CUDA extension cannot be used."""
    reason = _dispatch.unavailable_reason("cuda")
    return "loaded" if reason is None else reason


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


def op_choice(op_name: str) -> tuple[str, list[tuple[str, str]]]:
    """(backend that would run the op on this machine's default device, [(backend, why not) for the others])."""
    chosen = None
    skipped = []
    on_cuda = torch.cuda.is_available()
    for name in _dispatch.PRIORITY[op_name]:
        reason = _dispatch.unavailable_reason(name)
        if reason is None and not on_cuda and name != "reference":
            reason = "CPU tensors run the reference backend (CPU dispatch key)"
        if reason is None and chosen is None:
            chosen = name
        elif reason is not None:
            skipped.append((name, reason))
    return chosen or "none", skipped
