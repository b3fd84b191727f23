"""Path shim: PEFT users import ``peft.tuners.lora.bnb.Linear8bitLt``."""

from ...layers.lora_int8 import Linear8bitLt, dispatch_bnb_8bit

__all__ = ["Linear8bitLt", "dispatch_bnb_8bit"]
