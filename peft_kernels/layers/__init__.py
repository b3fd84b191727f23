from ._base import BaseTunerLayer, check_adapters_to_merge
from .lora import Embedding, Linear, LoraLayer

__all__ = ["BaseTunerLayer", "Embedding", "Linear", "LoraLayer", "check_adapters_to_merge"]
