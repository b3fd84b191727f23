"""Path shim: PEFT users import ``peft.tuners.lora.bnb.Linear8bitLt`` and ``Linear4bit``."""

from ...layers.lora_4bit import Linear4bit, dispatch_bnb_4bit
from ...layers.lora_int8 import Linear8bitLt, dispatch_bnb_8bit

__all__ = ["Linear4bit", "Linear8bitLt", "dispatch_bnb_4bit", "dispatch_bnb_8bit"]
