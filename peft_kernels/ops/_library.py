"""The ``peft_kernels`` torch.library namespace: Python owns every schema.

``define_op`` declares ``torch.ops.peft_kernels.<name>`` with
- a CPU kernel: the reference backend (or a forced backend, e.g. Triton under ``TRITON_INTERPRET=1``),
- a CUDA kernel: ``ops/_dispatch.select`` (first capable backend of the op's priority list),
- a fake (meta) kernel with ``torch._check`` preconditions, so ``torch.compile`` traces without running it.
"""

from __future__ import annotations

import torch

from . import _dispatch

LIB = torch.library.Library("peft_kernels", "DEF")  # noqa: TOR901 - Python defines every op of the namespace


def define_op(name: str, schema: str, fake) -> None:
    LIB.define(f"{name}{schema}")

    def cpu_kernel(*args):
        if _dispatch.forced_backend() is None:
            return _dispatch._backend_module("reference").get_impl(name)(*args)
        return _dispatch.select(name, *args)(*args)

    def cuda_kernel(*args):
        return _dispatch.select(name, *args)(*args)

    LIB.impl(name, cpu_kernel, "CPU")
    LIB.impl(name, cuda_kernel, "CUDA")
    torch.library.register_fake(f"peft_kernels::{name}", fake, lib=LIB)
