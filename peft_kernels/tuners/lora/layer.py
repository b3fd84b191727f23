"""Path shim: PEFT users import ``peft.tuners.lora.layer.{LoraLayer, Linear, Embedding}``."""

from ...layers.lora import Embedding, Linear, LoraLayer

__all__ = ["Embedding", "Linear", "LoraLayer"]
