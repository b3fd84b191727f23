from ._base import BaseTunerLayer, check_adapters_to_merge
from .lora import Conv2d, Embedding, Linear, LoraLayer

__all__ = ["BaseTunerLayer", "Conv2d", "Embedding", "Linear", "LoraLayer", "check_adapters_to_merge"]
