"""Functional ops: tensors and Python scalars in, tensors out. No modules, configs or adapter names."""

from .lora import LoraLinearFunction, lora_linear, lora_linear_multi

__all__ = ["LoraLinearFunction", "lora_linear", "lora_linear_multi"]
