"""Functional ops: tensors and Python scalars in, tensors out. No modules, configs or adapter names."""

from .lora import (
    LoraLinearFunction,
    LoraLinearInt8Function,
    lora_linear,
    lora_linear_int8,
    lora_linear_int8_multi,
    lora_linear_multi,
)
from .lora_4bit import LoraLinear4bitFunction, Quant4bit, lora_linear_4bit, lora_linear_4bit_multi, quant_operands
from .lora_mixed import lora_linear_mixed
from .prefix import KvAppendFunction, PrefixFillFunction, kv_append, prefix_kv_fill, prefix_kv_write

__all__ = [
    "KvAppendFunction",
    "LoraLinear4bitFunction",
    "LoraLinearFunction",
    "LoraLinearInt8Function",
    "PrefixFillFunction",
    "Quant4bit",
    "kv_append",
    "lora_linear",
    "lora_linear_4bit",
    "lora_linear_4bit_multi",
    "lora_linear_int8",
    "lora_linear_int8_multi",
    "lora_linear_mixed",
    "lora_linear_multi",
    "prefix_kv_fill",
    "prefix_kv_write",
    "quant_operands",
]
