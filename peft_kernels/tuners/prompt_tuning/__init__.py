from ...mapping import register_tuner
from ...utils.peft_types import PeftType
from .config import PromptTuningConfig, PromptTuningInit
from .model import PromptEmbedding

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]

register_tuner(PeftType.PROMPT_TUNING, PromptTuningConfig)
