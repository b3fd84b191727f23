from ...mapping import register_tuner
from ...utils.peft_types import PeftType
from .config import PrefixTuningConfig
from .model import PrefixEncoder

__all__ = ["PrefixEncoder", "PrefixTuningConfig"]

register_tuner(PeftType.PREFIX_TUNING, PrefixTuningConfig)
