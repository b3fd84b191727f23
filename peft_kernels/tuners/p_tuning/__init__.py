from .config import PromptEncoderConfig, PromptEncoderReparameterizationType

__all__ = ["PromptEncoderConfig", "PromptEncoderReparameterizationType"]
