from ._base import BaseTunerLayer, check_adapters_to_merge
from .lora import Embedding, Linear, LoraLayer
from .lora_conv import Conv1d, Conv2d, Conv3d
from .lora_mha import MultiheadAttention

__all__ = [
    "BaseTunerLayer",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "Linear",
    "LoraLayer",
    "MultiheadAttention",
    "check_adapters_to_merge",
]
