"""Path shim: PEFT users import ``peft.tuners.lora.layer.{LoraLayer, Linear, Embedding, Conv2d}``."""

from ...layers.lora import Conv2d, Embedding, Linear, LoraLayer

__all__ = ["Conv2d", "Embedding", "Linear", "LoraLayer"]
