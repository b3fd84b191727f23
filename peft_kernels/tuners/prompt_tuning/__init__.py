from .config import PromptTuningConfig, PromptTuningInit

__all__ = ["PromptTuningConfig", "PromptTuningInit"]
