from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Union

from ...config import PromptLearningConfig
from ...utils.peft_types import PeftType


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual-token embeddings reparameterized by an MLP or a bidirectional LSTM + MLP."""

    encoder_reparameterization_type: Union[str, PromptEncoderReparameterizationType] = field(
        default=PromptEncoderReparameterizationType.MLP
    )
    encoder_hidden_size: int = field(default=None, metadata={"help": "The hidden size of the prompt encoder"})
    encoder_num_layers: int = field(default=2, metadata={"help": "The number of layers of the prompt encoder"})
    encoder_dropout: float = field(default=0.0, metadata={"help": "The dropout of the prompt encoder"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.P_TUNING
