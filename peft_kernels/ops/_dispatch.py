"""Which backend runs an op: per-op priority lists (data), reasons, and the forced-backend override.

Resolution for one call:
1. ``backend=`` passed to the functional op (``peft_kernels.ops.lora_linear(..., backend="triton")``), else
2. the ``PEFT_KERNELS_BACKEND`` environment variable, else
3. the first backend of the op's priority list whose ``unavailable_reason()`` and
   ``not_supported_reasons(op, *args)`` are both empty.

A named backend (1 or 2) that cannot run raises ``NotImplementedError`` listing every backend's reasons:
never a silent fallback when the user asked for one. Automatic choice (3) always ends at the reference.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os

import torch

logger = logging.getLogger("peft_kernels")

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "PEFT_KERNELS_BACKEND"

# Priority per op, first that can run wins. GEMM-shaped LoRA ops: Triton first (fused GEMM + low-rank
# update); CUDA C++ for the small-M decode and copy-shaped ops it implements. Reference last, always.
PRIORITY: dict[str, tuple[str, ...]] = {
    "lora_linear_fwd": ("triton", "cuda", "reference"),
    "lora_linear_bwd": ("triton", "cuda", "reference"),
    # int8 W8A16: the CUDA GEMV serves decode (M <= 16) and declines the rest; training shapes go to Triton.
    "lora_linear_int8_fwd": ("cuda", "triton", "reference"),
    "lora_linear_int8_bwd": ("triton", "cuda", "reference"),
    # 4-bit NF4/FP4 (QLoRA): Triton decodes the codes inside the GEMM (the GEMV path for decode shapes included).
    "lora_linear_4bit_fwd": ("triton", "reference"),
    "lora_linear_4bit_bwd": ("triton", "reference"),
    # Prefix K/V copies and their batch reduction: plain CUDA copy kernels (16-byte vectors) first.
    "prefix_kv_fill": ("cuda", "triton", "reference"),
    "kv_append": ("cuda", "triton", "reference"),
    "prefix_kv_fill_bwd": ("cuda", "triton", "reference"),
}

_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("peft_kernels_backend", default=None)
_backend_modules: dict[str, object] = {}
_backend_import_errors: dict[str, str] = {}
_logged_fallbacks: set[tuple[str, str]] = set()


def _backend_module(name: str):
    """Imports backends/<name> once; an import failure becomes that backend's reason, never an exception."""
    if name not in _backend_modules and name not in _backend_import_errors:
        try:
            _backend_modules[name] = importlib.import_module(f"peft_kernels.backends.{name}")
        except Exception as exc:  # any failure to import a backend is a reason, not a crash
            _backend_import_errors[name] = f"import failed: {type(exc).__name__}: {exc}"
    return _backend_modules.get(name)


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run at all on this machine, or None."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}; expected one of {', '.join(BACKENDS)}.")
    module = _backend_module(name)
    if module is None:
        return _backend_import_errors[name]
    return module.unavailable_reason()


def call_reasons(name: str, op_name: str, *args) -> list[str]:
    """Every reason why backend ``name`` cannot run this call of ``op_name`` (empty: it can)."""
    reason = unavailable_reason(name)
    if reason is not None:
        return [reason]
    return list(_backend_module(name).not_supported_reasons(op_name, *args))


def requested_backend(backend: str | None = None) -> str | None:
    """The backend the user named (argument, then environment), validated; None for automatic choice."""
    name = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if name is not None and name not in BACKENDS:
        source = "backend=" if backend is not None else f"{ENV_VAR}="
        raise ValueError(f"Unknown backend {source}{name!r}; expected one of {', '.join(BACKENDS)}.")
    return name


@contextlib.contextmanager
def force_backend(name: str | None):
    """Within the block, ops run on ``name`` (or raise); None keeps automatic choice."""
    token = _forced_backend.set(name)
    try:
        yield
    finally:
        _forced_backend.reset(token)


def forced_backend() -> str | None:
    """The backend forced for the op calls running now (None: automatic choice; always None when compiling)."""
    if torch.compiler.is_compiling():
        return None
    return _forced_backend.get()


def run_with_backend(backend: str | None, fn, *args):
    """fn(*args) with ``backend`` (argument, else PEFT_KERNELS_BACKEND) forced for every op it calls.

    Under torch.compile the choice is automatic: the context variable cannot be traced (a graph break), and a
    compiled graph is specialised to the device it runs on anyway. Autograd Functions record the forced
    backend in ``ctx`` and re-enter it in backward, which autograd may run on another thread.
    """
    if torch.compiler.is_compiling():
        return fn(*args)
    name = requested_backend(backend)
    if name is None:
        return fn(*args)
    token = _forced_backend.set(name)
    try:
        return fn(*args)
    finally:
        _forced_backend.reset(token)


def select(op_name: str, *args):
    """The implementation that runs this call: the forced backend's, or the first capable one's."""
    forced = _forced_backend.get()
    if forced is not None:
        reasons = call_reasons(forced, op_name, *args)
        if reasons:
            raise NotImplementedError(_no_backend_message(op_name, forced, args))
        return _backend_module(forced).get_impl(op_name)
    for name in PRIORITY[op_name]:
        reasons = call_reasons(name, op_name, *args)
        if not reasons:
            return _backend_module(name).get_impl(op_name)
        if name != "reference" and (op_name, name) not in _logged_fallbacks and _on_accelerator(args):
            _logged_fallbacks.add((op_name, name))
            logger.info("peft_kernels: %s not on %s: %s", op_name, name, "; ".join(reasons))
    raise NotImplementedError(_no_backend_message(op_name, None, args))


def _on_accelerator(args) -> bool:
    for arg in args:
        if hasattr(arg, "device"):
            return arg.device.type != "cpu"
    return False


def _no_backend_message(op_name: str, forced: str | None, args) -> str:
    head = f"Backend {forced!r} cannot run {op_name}" if forced is not None else f"No backend can run {op_name}"
    lines = [f"{head}. Reasons per backend:"]
    for name in BACKENDS:
        reasons = call_reasons(name, op_name, *args)
        lines.append(f"  {name}: {'; '.join(reasons) if reasons else 'available'}")
    return "\n".join(lines)


def backend_table(op_names=None) -> list[tuple[str, str, str]]:
    """Rows (op, backend, status) for ``peft-kernels info``: 'unavailable: …' or 'available'."""
    rows = []
    for op_name in op_names or PRIORITY:
        for name in PRIORITY[op_name]:
            reason = unavailable_reason(name)
            rows.append((op_name, name, "available" if reason is None else f"unavailable: {reason}"))
    return rows
