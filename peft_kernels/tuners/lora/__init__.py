from ...mapping import register_tuner
from ...utils.peft_types import PeftType
from .config import LoftQConfig, LoraConfig, LoraRuntimeConfig
from .layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer, MultiheadAttention
from .model import LoraModel

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "Linear",
    "LoftQConfig",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "LoraRuntimeConfig",
    "MultiheadAttention",
]

register_tuner(PeftType.LORA, LoraConfig, LoraModel)


def __getattr__(name):
    # Linear8bitLt and Linear4bit need nothing optional to import, but loads lazily to keep `import peft_kernels` light.
    if name == "Linear8bitLt":
        from ...layers.lora_int8 import Linear8bitLt

        return Linear8bitLt
    if name == "Linear4bit":
        from ...layers.lora_4bit import Linear4bit

        return Linear4bit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
