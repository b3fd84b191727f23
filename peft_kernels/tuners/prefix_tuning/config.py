from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ...config import PromptLearningConfig
from ...utils.peft_types import PeftType


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: learned key/value prefixes of ``num_virtual_tokens`` rows for every attention layer."""

    init_weights: Optional[Literal["zero"]] = field(default=None)
    encoder_hidden_size: int = field(default=None, metadata={"help": "The hidden size of the encoder"})
    prefix_projection: bool = field(default=False, metadata={"help": "Whether to project the prefix tokens"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.PREFIX_TUNING
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
