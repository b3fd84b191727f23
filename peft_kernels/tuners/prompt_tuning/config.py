from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PromptLearningConfig
from ...utils.peft_types import PeftType


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` learned input embeddings prepended to the sequence."""

    prompt_tuning_init: Union[PromptTuningInit, str] = field(default=PromptTuningInit.RANDOM)
    prompt_tuning_init_text: Optional[str] = field(default=None)
    tokenizer_name_or_path: Optional[str] = field(default=None)
    tokenizer_kwargs: Optional[dict] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.PROMPT_TUNING
        if self.prompt_tuning_init == PromptTuningInit.TEXT and not self.tokenizer_name_or_path:
            raise ValueError(
                f"When prompt_tuning_init='{PromptTuningInit.TEXT.value}', tokenizer_name_or_path can't be None."
            )
        if self.prompt_tuning_init == PromptTuningInit.TEXT and self.prompt_tuning_init_text is None:
            raise ValueError(
                f"When prompt_tuning_init='{PromptTuningInit.TEXT.value}', prompt_tuning_init_text can't be None."
            )
        if self.tokenizer_kwargs and self.prompt_tuning_init != PromptTuningInit.TEXT:
            raise ValueError(
                f"tokenizer_kwargs only valid when using prompt_tuning_init='{PromptTuningInit.TEXT.value}'."
            )
