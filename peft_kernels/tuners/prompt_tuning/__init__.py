from .config import PromptTuningConfig, PromptTuningInit
from .model import PromptEmbedding

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]
