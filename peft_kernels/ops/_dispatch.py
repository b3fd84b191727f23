"""Which backend runs an op: ONE table (priority per op and device type), each backend's registered
implementations and capability check, the choice cached per call signature, and the forced-backend override.

Resolution for one call of ``torch.ops.peft_kernels.<op>``:
1. ``backend=`` passed to the functional op (``peft_kernels.ops.lora_linear(..., backend="triton")``), else
2. the ``PEFT_KERNELS_BACKEND`` environment variable, else
3. the first backend of the op's priority list for the tensors' device type (``priority``) whose
   ``unavailable_reason()`` and capability check (``not_supported_reasons(op, *args)``) are both empty.
   CPU tensors: the reference (the fused backends are GPU code; Triton under ``TRITON_INTERPRET=1`` runs CPU
   tensors only when forced, for tests). CUDA tensors: ``PRIORITY``.

The choice is made once per call signature (op, forced backend, priority list, and for every tensor argument its
device, dtype, shape, strides, requires_grad and 16-byte alignment: everything the checks read; not the arguments
no check reads, such as kv_append's offset) and cached, so a
repeated call costs one dictionary lookup (CPU tensors with automatic choice: one lookup per op, nothing else is
read); the implementations never check again. A named backend (1 or 2) that cannot run
raises ``NotImplementedError`` listing every backend's reasons: never a silent fallback when the user asked for
one. Automatic choice (3) always ends at the reference, which runs everything.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os

import torch

from ..backends import positional

logger = logging.getLogger("peft_kernels")

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "PEFT_KERNELS_BACKEND"

# Priority per op on CUDA tensors, first that can run wins. The CUDA C++ ops serve what they were written for and
# decline the rest with a reason: the decode GEMVs (M <= 16, fp16/bf16, no dropout; dense and int8 weights) and
# the prefix K/V copy kernels. Triton runs the GEMM-shaped LoRA work. The reference is last, always.
PRIORITY: dict[str, tuple[str, ...]] = {
    "lora_linear_fwd": ("cuda", "triton", "reference"),
    "lora_linear_inference": ("cuda", "triton", "reference"),  # the forward's one-adapter inference form
    "lora_linear_bwd": ("triton", "reference"),
    # Mixed-adapter batches (adapter_names=): one fused Triton kernel pair; forward only.
    "lora_linear_mixed": ("triton", "reference"),
    # 4-bit NF4/FP4 (QLoRA): Triton decodes the codes inside the GEMM (its GEMV path serves decode shapes).
    "lora_linear_4bit_fwd": ("triton", "reference"),
    "lora_linear_4bit_bwd": ("triton", "reference"),
    "prefix_kv_fill": ("cuda", "triton", "reference"),
    "kv_append": ("cuda", "triton", "reference"),
    "prefix_kv_fill_bwd": ("cuda", "triton", "reference"),
}
# What a backend declines on its own op (its capability check has the full list), shown by ``peft-kernels info``.
SCOPE = {
    ("lora_linear_fwd", "cuda"): "decode only: M <= 16, fp16/bf16, one adapter, no dropout; dense or int8 weight",
    ("lora_linear_fwd", "triton"): "one adapter",
    ("lora_linear_inference", "cuda"): "decode only: M <= 16, fp16/bf16; dense or int8 weight",
    ("lora_linear_bwd", "triton"): "one adapter",
}
# CPU tensors: the reference is the CPU path (see the module docstring).
CPU_PRIORITY = ("reference",)

# Registered ops that are another op with its arguments rearranged (e.g. ``lora_linear_int8_fwd``, the int8
# weight format of ``lora_linear_fwd``): name -> (op, function mapping the alias's arguments to the op's).
ALIASES: dict[str, tuple[str, object]] = {}
# Registered ops that a backend may implement or inherit: name -> (target op, translate, finish). A backend without
# its own kernel for such an op runs the target's: ``translate(*args)`` gives the target's arguments (its capability
# check decides on them), ``finish(args, result)`` the op's result from the target's. So a leaner schema for a hot
# call (``lora_linear_inference``) costs the backends nothing.
DERIVED: dict[str, tuple[str, object, object]] = {}

_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("peft_kernels_backend", default=None)
_packages: dict[str, object] = {}
_package_errors: dict[str, str] = {}
_implementations: dict[tuple[str, str], object] = {}  # (backend, op) -> module defining op + its check
_choices: dict[tuple, tuple[str, object]] = {}  # call signature -> (backend, module defining the op's function)
# Argument positions no capability check reads, left out of the call signature: kv_append's offset changes every
# decode step, and keyed on it every step would be a cache miss running the checks again.
_UNREAD_ARGUMENTS: dict[str, frozenset[int]] = {"kv_append": frozenset({4})}
_MAX_CHOICES = 4096  # shapes that change every call (prefill lengths, decode offsets) must not grow it forever
_logged_fallbacks: set[tuple[str, str]] = set()

# The environment variable is read on every public call (a user may set it after import), but not through
# ``os.environ.get``: its key encoding and Mapping protocol cost ~2 µs per call (measured), the dict behind it 0.05 µs.
# CPython updates that dict on every ``os.environ`` write (monkeypatch.setenv included).
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENV_DATA is not None and hasattr(os.environ, "encodekey") else None


def _environment_backend() -> str | None:
    if _ENV_KEY is None:
        return os.environ.get(ENV_VAR)
    value = _ENV_DATA.get(_ENV_KEY)
    return None if value is None else os.environ.decodevalue(value)


def _package(name: str):
    """Imports backends/<name> once; an import failure becomes that backend's reason, never an exception."""
    if name not in _packages and name not in _package_errors:
        try:
            _packages[name] = importlib.import_module(f"peft_kernels.backends.{name}")
        except Exception as exc:  # any failure to import a backend is a reason, not a crash
            _package_errors[name] = f"import failed: {type(exc).__name__}: {exc}"
    return _packages.get(name)


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run at all on this machine, or None."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}; expected one of {', '.join(BACKENDS)}.")
    package = _package(name)
    return _package_errors[name] if package is None else package.unavailable_reason()


def _module(name: str, op_name: str):
    """The module of backend ``name`` that implements ``op_name``, a ``_Derived`` one for an op it inherits from its
    target (``DERIVED``), or None (the backend has no such kernel)."""
    key = (name, op_name)
    if key not in _implementations:
        module_name = _package(name).IMPLEMENTATIONS.get(op_name)
        if module_name:
            module = importlib.import_module(f"peft_kernels.backends.{name}.{module_name}")
        elif op_name in DERIVED and (target_module := _module(name, DERIVED[op_name][0])) is not None:
            module = _Derived(op_name, target_module)
        else:
            module = None
        _implementations[key] = module
    return _implementations[key]


def _has_kernel(package, op_name: str) -> bool:
    """Whether a backend package implements ``op_name`` or inherits it (``DERIVED``), without importing it."""
    target = DERIVED.get(op_name, (None,))[0]
    return op_name in package.IMPLEMENTATIONS or target in package.IMPLEMENTATIONS


class _Derived:
    """A backend's implementation of a ``DERIVED`` op: its target op's function and capability check, on the
    translated call. The target function is looked up at call time (a test's monkeypatch of it is honoured)."""

    def __init__(self, op_name: str, target_module) -> None:
        target, translate, finish = DERIVED[op_name]

        def run(*args):
            return finish(args, getattr(target_module, target)(*positional(target, translate(*args))))

        def not_supported_reasons(_op_name: str, *args) -> list[str]:
            return list(target_module.not_supported_reasons(target, *translate(*args)))

        setattr(self, op_name, run)
        self.not_supported_reasons = not_supported_reasons


def implementation(name: str, op_name: str):
    """Backend ``name``'s function for ``op_name`` (tests call it to reach one backend without dispatch)."""
    return getattr(_module(name, op_name), op_name)


def _resolve(op_name: str, args: tuple) -> tuple[str, tuple]:
    if op_name in ALIASES:
        target, translate = ALIASES[op_name]
        return target, tuple(translate(*args))
    return op_name, args


def check_reasons(name: str, op_name: str, *args) -> list[str]:
    """Backend ``name``'s capability check for this call alone (machine availability aside)."""
    if op_name in ALIASES and _module(name, ALIASES[op_name][0]) is None:
        return [f"no {name} kernel for {op_name}"]
    op_name, args = _resolve(op_name, args)
    module = _module(name, op_name)
    if module is None:
        return [f"no {name} kernel for {op_name}"]
    return list(module.not_supported_reasons(op_name, *args))


def call_reasons(name: str, op_name: str, *args) -> list[str]:
    """Every reason why backend ``name`` cannot run this call of ``op_name`` (empty: it can)."""
    reason = unavailable_reason(name)
    return [reason] if reason is not None else check_reasons(name, op_name, *args)


def requested_backend(backend: str | None = None) -> str | None:
    """The backend the user named (argument, then environment), validated; None for automatic choice."""
    name = backend if backend is not None else _environment_backend() or None
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
    if backend is None and _ENV_KEY is not None and _ENV_KEY not in _ENV_DATA:
        return fn(*args)  # the common case, per layer and step: nothing to force, nothing else to read
    name = requested_backend(backend)
    if name is None:
        return fn(*args)
    token = _forced_backend.set(name)
    try:
        return fn(*args)
    finally:
        _forced_backend.reset(token)


def priority(op_name: str, device_type: str) -> tuple[str, ...]:
    """The backends tried, in order, for ``op_name`` on tensors of ``device_type``."""
    return CPU_PRIORITY if device_type == "cpu" else PRIORITY[op_name]


def _device_type(args) -> str:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device.type
        if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
            return arg[0].device.type
    return "cpu"


def _signature(arg):
    if isinstance(arg, torch.Tensor):
        return (arg.device, arg.dtype, arg.shape, arg.stride(), arg.requires_grad, arg.data_ptr() % 16)
    if isinstance(arg, (list, tuple)):
        return tuple(_signature(a) for a in arg)
    return arg


def run(op_name: str, args: tuple):
    """The body of every registered kernel: the chosen backend's function on ``args`` (trailing defaults
    dropped, see ``backends.positional``)."""
    forced = _forced_backend.get()
    first = args[0]
    if type(first) is list and first:
        first = first[0]  # prefix_kv_fill_bwd: the gradient lists come first
    # is_cpu, not device.type == "cpu": the latter builds a torch.device per call (~2 µs, measured; is_cpu 0.1 µs).
    if forced is None and isinstance(first, torch.Tensor) and first.is_cpu:
        choice = _choices.get((op_name, "cpu"))  # the CPU choice depends on nothing else: one lookup
        if choice is None:
            choice = _chosen(op_name, args)
    else:
        choice = _chosen(op_name, args)
    # getattr at call time: one attribute lookup, and a test's monkeypatch of a backend function is honoured.
    return getattr(choice[1], op_name)(*positional(op_name, args))


def chosen_backend(op_name: str, *args) -> str:
    """The backend that runs this call (forced or automatic), as ``run`` chooses it; aliases resolved."""
    op_name, args = _resolve(op_name, args)
    return _chosen(op_name, args)[0]


def _chosen(op_name: str, args: tuple) -> tuple[str, object]:
    """(backend name, module) for this call, from the cache or chosen now."""
    forced = _forced_backend.get()
    device_type = _device_type(args)
    if forced is None and device_type == "cpu":
        key = (op_name, "cpu")  # the CPU choice depends on nothing else
    else:
        # PRIORITY is data that tests and benchmarks pin at run time: part of the key, so a pin takes effect.
        unread = _UNREAD_ARGUMENTS.get(op_name)
        read = args if unread is None else tuple(a for i, a in enumerate(args) if i not in unread)
        key = (op_name, forced, PRIORITY[op_name], _signature(read))
    choice = _choices.get(key)
    if choice is None:
        name = _choose(op_name, forced, device_type, args)
        choice = (name, _module(name, op_name))
        if len(_choices) >= _MAX_CHOICES:
            _choices.clear()
        _choices[key] = choice
    return choice


def _choose(op_name: str, forced: str | None, device_type: str, args: tuple) -> str:
    if forced is not None:
        if call_reasons(forced, op_name, *args):
            raise NotImplementedError(_no_backend_message(op_name, forced, args))
        return forced
    for name in priority(op_name, device_type):
        reasons = call_reasons(name, op_name, *args)
        if not reasons:
            return name
        if name != "reference" and (op_name, name) not in _logged_fallbacks and device_type != "cpu":
            _logged_fallbacks.add((op_name, name))
            logger.info("peft_kernels: %s not on %s: %s", op_name, name, "; ".join(reasons))
    raise NotImplementedError(_no_backend_message(op_name, None, args))


def _no_backend_message(op_name: str, forced: str | None, args) -> str:
    head = f"Backend {forced!r} cannot run {op_name}" if forced is not None else f"No backend can run {op_name}"
    lines = [f"{head}. Reasons per backend:"]
    for name in BACKENDS:
        reasons = call_reasons(name, op_name, *args)
        lines.append(f"  {name}: {'; '.join(reasons) if reasons else 'available'}")
    return "\n".join(lines)


def clear_choices() -> None:
    """Forget every cached choice (after changing ``PRIORITY`` or a backend's availability in a running process)."""
    _choices.clear()


def backend_table() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """Rows (op, device type, [(backend, 'available' | 'no kernel' | 'unavailable: …')]) in priority order, for
    ``peft-kernels info``; aliases are listed with the op they run."""
    rows = []
    for op_name in PRIORITY:
        for device_type in ("cuda", "cpu"):
            entries = []
            for name in priority(op_name, device_type):
                reason = unavailable_reason(name)
                package = _package(name)
                if package is not None and not _has_kernel(package, op_name):
                    status = "no kernel"
                else:
                    status = "available" if reason is None else f"unavailable: {reason}"
                scope = SCOPE.get((op_name, name))
                entries.append((name, f"{status} [{scope}]" if scope else status))
            rows.append((op_name, device_type, entries))
    return rows
