from ...mapping import register_tuner
from ...utils.peft_types import PeftType
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType
from .model import PromptEncoder

__all__ = ["PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]

register_tuner(PeftType.P_TUNING, PromptEncoderConfig)
