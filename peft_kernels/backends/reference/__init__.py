"""The reference backend: pure PyTorch, importable everywhere, the specification of every op."""

from __future__ import annotations

import importlib

# op name -> module under backends/reference/ that defines a function of the same name
_OP_MODULES = {
    "lora_linear_fwd": "lora",
    "lora_linear_bwd": "lora",
    "lora_linear_int8_fwd": "lora_int8",
    "lora_linear_int8_bwd": "lora_int8",
    "lora_linear_4bit_fwd": "lora_4bit",
    "lora_linear_4bit_bwd": "lora_4bit",
    "prefix_kv_fill": "prefix",
    "kv_append": "prefix",
    "prefix_kv_fill_bwd": "prefix",
}


def unavailable_reason() -> str | None:
    return None


def get_impl(op_name: str):
    module = importlib.import_module(f"{__name__}.{_OP_MODULES[op_name]}")
    return getattr(module, op_name)


def not_supported_reasons(op_name: str, *args) -> list[str]:
    if op_name not in _OP_MODULES:
        return [f"op {op_name} has no reference implementation"]
    return []
