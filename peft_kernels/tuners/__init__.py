from .lora import LoftQConfig, LoraConfig, LoraModel, LoraRuntimeConfig
from .p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from .prefix_tuning import PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig, PromptTuningInit

__all__ = [
    "LoftQConfig",
    "LoraConfig",
    "LoraModel",
    "LoraRuntimeConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
]
