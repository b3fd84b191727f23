"""Backends: ``reference`` (pure torch, the spec), ``triton``, ``cuda``; and the ops they implement.

Every op's parameter list is stated once, here, as its torch schema (``SCHEMAS``): ``ops/`` registers these
schemas with torch.library, the dispatcher (``ops/_dispatch.py``) binds a call's arguments to them, and each
backend's capability check reads the bound call by name (``bind(op_name, args).x``). A backend function of
an op takes the schema's parameters in schema order; trailing parameters left at their default are not passed
(``positional``), so a dense-weight call of ``lora_linear_fwd`` looks exactly like it did before the weight
formats joined it.

Every backend package exposes, for the dispatcher only:

- ``unavailable_reason() -> str | None``: why the whole backend cannot run here (decided once, cached);
- ``IMPLEMENTATIONS: dict[op_name, module]``: ``backends/<name>/<module>.py`` defines a function named like the
  op and ``not_supported_reasons(op_name, *args) -> list[str]``, the one capability check of its ops (empty:
  this call can run). The implementation itself does not check again.
"""

from __future__ import annotations

import collections
import functools

import torch

# The base weight is ``weight`` (+ ``weight_scale`` for int8): formats are stated in ``peft_kernels/formats.py``.
# The forward's second output is what its backward needs: [S_a], then, from the reference on CPU tensors only
# (``reference.lora.keeps_masks``), each dropout keep mask (bool (M, K) per adapter with p > 0): regenerating one
# there costs more than the low-rank update. Every other backend and device redraws the masks from the seeds. The
# backward reads kept masks from ``saved_s`` and redraws the others.
_QUANT_4BIT = (
    "Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, Tensor code, "
    "int blocksize, int nested_blocksize, int[] shape"
)
SCHEMAS = {
    "lora_linear_fwd": "(Tensor x, Tensor weight, Tensor? bias, Tensor[] lora_a, Tensor[] lora_b, "
    "Tensor?[] lora_b_bias, float[] scaling, float[] dropout_p, Tensor? seeds, Tensor? weight_scale=None) "
    "-> (Tensor, Tensor[])",
    # Inference with one adapter and no dropout (the per-token decode call): x (*, K) as given, y (*, N) only. Scalar
    # and single-tensor arguments: on CPU each list argument costs the torch.ops boundary ~3-4 µs (measured). A
    # backend without its own kernel runs it as lora_linear_fwd (ops/_dispatch.py DERIVED).
    "lora_linear_inference": "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling, "
    "Tensor? lora_b_bias=None, Tensor? weight_scale=None) -> Tensor",
    "lora_linear_bwd": "(Tensor dy, Tensor x, Tensor weight, Tensor[] lora_a, Tensor[] lora_b, Tensor[] saved_s, "
    "float[] scaling, float[] dropout_p, Tensor? seeds, bool[] output_mask, Tensor? weight_scale=None) "
    "-> (Tensor?, Tensor[], Tensor[])",
    "lora_linear_mixed": "(Tensor x, Tensor weight, Tensor? bias, Tensor[] lora_a, Tensor[] lora_b, "
    "Tensor?[] lora_b_bias, float[] scaling, Tensor row_adapter) -> Tensor",
    # 4-bit NF4/FP4 base (bitsandbytes quantize_4bit; format stated in backends/reference/lora_4bit.py): only
    # tensors and scalars, so bitsandbytes is needed only to make the weights.
    "lora_linear_4bit_fwd": f"(Tensor x, {_QUANT_4BIT}, Tensor? bias, Tensor[] lora_a, Tensor[] lora_b, "
    "Tensor?[] lora_b_bias, float[] scaling, float[] dropout_p, Tensor? seeds) -> (Tensor, Tensor[])",
    "lora_linear_4bit_bwd": f"(Tensor dy, Tensor x, {_QUANT_4BIT}, Tensor[] lora_a, Tensor[] lora_b, "
    "Tensor[] saved_s, float[] scaling, float[] dropout_p, Tensor? seeds, bool[] output_mask) "
    "-> (Tensor?, Tensor[], Tensor[])",
    # Mutated buffers are declared (Tensor(a!)); the two lists get distinct alias sets because a layer's K and V
    # buffers never alias.
    "prefix_kv_fill": "(Tensor prefix, Tensor(a!)[] k_bufs, Tensor(b!)[] v_bufs) -> ()",
    "kv_append": "(Tensor(a!) k_buf, Tensor(b!) v_buf, Tensor k, Tensor v, int offset) -> ()",
    "prefix_kv_fill_bwd": "(Tensor[] dk_bufs, Tensor[] dv_bufs, int P) -> Tensor",
}


@functools.cache
def _parameters(op_name: str) -> tuple[type, tuple]:
    """(namedtuple class of the op's parameters, their defaults: a ``_REQUIRED`` marker where there is none)."""
    schema = torch._C.parse_schema(f"peft_kernels::{op_name}{SCHEMAS[op_name]}")
    names = [arg.name for arg in schema.arguments]
    defaults = tuple(arg.default_value if arg.has_default_value() else _REQUIRED for arg in schema.arguments)
    return collections.namedtuple(f"{op_name}_call", names), defaults


_REQUIRED = object()


def bind(op_name: str, args: tuple):
    """The call's arguments by name (``.x``, ``.weight``, …); missing trailing ones take their defaults."""
    cls, defaults = _parameters(op_name)
    if len(args) < len(defaults):
        args = (*args, *defaults[len(args) :])
    return cls(*args)


def positional(op_name: str, args: tuple) -> tuple:
    """``args`` without the trailing parameters that equal their defaults (None / False)."""
    defaults = _parameters(op_name)[1]
    end = len(args)
    while end and args[end - 1] is defaults[end - 1]:  # a required parameter's marker is never an argument
        end -= 1
    return args if end == len(args) else args[:end]
