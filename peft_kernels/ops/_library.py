"""The ``peft_kernels`` torch.library namespace: Python owns every schema (stated in ``backends/__init__.py``).

``define_op`` declares ``torch.ops.peft_kernels.<name>`` with
- one CPU and one CUDA kernel, both ``_dispatch.run``: the cached choice of the op's table (the reference on CPU
  tensors unless a backend is forced, e.g. Triton under ``TRITON_INTERPRET=1``);
- a fake (meta) kernel with ``torch._check`` preconditions, so ``torch.compile`` traces without running it.
``define_alias`` declares an op that is another one with its arguments rearranged (CompositeImplicitAutograd:
it decomposes into the target op, so it has no kernel, fake or dispatch entry of its own).
"""

from __future__ import annotations

import torch

from ..backends import SCHEMAS
from . import _dispatch

LIB = torch.library.Library("peft_kernels", "DEF")  # noqa: TOR901 - Python defines every op of the namespace


def define_op(name: str, fake) -> None:
    LIB.define(f"{name}{SCHEMAS[name]}")

    def kernel(*args):
        return _dispatch.run(name, args)

    LIB.impl(name, kernel, "CPU")
    LIB.impl(name, kernel, "CUDA")
    torch.library.register_fake(f"peft_kernels::{name}", fake, lib=LIB)


def define_alias(name: str, target: str, order: tuple[str, ...]) -> None:
    """``torch.ops.peft_kernels.<name>`` = ``target`` with the parameters named in ``order``, in that order (the
    others stay at their defaults). Its schema is derived from the target's, so the parameter list is not written
    again; CompositeImplicitAutograd, so it decomposes into ``target`` (no kernel, fake or table entry of its own).
    """
    params_text, returns = SCHEMAS[target][1:].split(") -> ")
    declared = {p.split("=")[0].split()[-1]: p.split("=")[0] for p in params_text.split(", ")}  # name -> "type name"
    LIB.define(f"{name}({', '.join(declared[n] for n in order)}) -> {returns}")
    schema = torch._C.parse_schema(f"peft_kernels::{target}{SCHEMAS[target]}")
    names = [arg.name for arg in schema.arguments]
    defaults = [arg.default_value if arg.has_default_value() else None for arg in schema.arguments]
    op = getattr(torch.ops.peft_kernels, target)

    def translate(*args):
        given = dict(zip(order, args))
        return tuple(given.get(n, d) for n, d in zip(names, defaults))

    def composite(*args):
        return op(*translate(*args))

    LIB.impl(name, composite, "CompositeImplicitAutograd")
    _dispatch.ALIASES[name] = (target, translate)
