"""Functional ops: tensors and Python scalars in, tensors out. No modules, configs or adapter names."""

from .lora import LoraLinearFunction, lora_linear, lora_linear_multi

__all__ = ["LoraLinearFunction", "lora_linear", "lora_linear_multi"]

from .lora_int8 import LoraLinearInt8Function, lora_linear_int8, lora_linear_int8_multi  # noqa: E402
from .prefix import KvAppendFunction, PrefixFillFunction, kv_append, prefix_kv_write  # noqa: E402

__all__ += ["LoraLinearInt8Function", "lora_linear_int8", "lora_linear_int8_multi"]
__all__ += ["KvAppendFunction", "PrefixFillFunction", "kv_append", "prefix_kv_write"]
