"""Path shim: PEFT users import ``peft.tuners.lora.layer.{LoraLayer, Linear, Embedding, Conv1d, …}``."""

from ...layers.lora import Embedding, Linear, LoraLayer
from ...layers.lora_conv import Conv1d, Conv2d, Conv3d
from ...layers.lora_mha import MultiheadAttention

__all__ = ["Conv1d", "Conv2d", "Conv3d", "Embedding", "Linear", "LoraLayer", "MultiheadAttention"]
