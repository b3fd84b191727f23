"""PromptEncoder: P-tuning's reparameterized virtual-token embeddings (PEFT 0.21.2 names and shapes)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .config import PromptEncoderConfig, PromptEncoderReparameterizationType

_UNKNOWN_TYPE = "Prompt encoder type not recognized. Please use one of MLP (recommended) or LSTM."


class PromptEncoder(nn.Module):
    """prompts = mlp_head(embedding(idx))  (MLP)  or  mlp_head(lstm_head(embedding(idx))[0])  (LSTM).

    Shapes (``N = num_virtual_tokens · num_transformer_submodules``, ``D`` token_dim, ``Eh`` encoder_hidden_size)::

        embedding  Embedding(N, D)
        MLP        mlp_head  = Linear(D, Eh) → ReLU → Linear(Eh, Eh) → ReLU → Linear(Eh, D)
        LSTM       lstm_head = LSTM(D, Eh, num_layers=encoder_num_layers, dropout=encoder_dropout,
                                    bidirectional=True, batch_first=True)
                   mlp_head  = Linear(2Eh, 2Eh) → ReLU → Linear(2Eh, D)
        forward    idx (B, N) long → (B, N, D)

    In inference mode only ``embedding`` is built: checkpoints store the heads' *output* as ``prompt_embeddings``.
    The LSTM is bidirectional, so every output row depends on every virtual token.
    """

    def __init__(self, config):
        super().__init__()
        self.token_dim = config.token_dim
        self.input_size = self.token_dim
        self.output_size = self.token_dim
        self.hidden_size = config.encoder_hidden_size
        self.total_virtual_tokens = config.num_virtual_tokens * config.num_transformer_submodules
        self.encoder_type = config.encoder_reparameterization_type

        self.embedding = nn.Embedding(self.total_virtual_tokens, self.token_dim)
        if config.inference_mode:
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=self.input_size,
                hidden_size=self.hidden_size,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(self.hidden_size * 2, self.hidden_size * 2),
                nn.ReLU(),
                nn.Linear(self.hidden_size * 2, self.output_size),
            )
        elif self.encoder_type == PromptEncoderReparameterizationType.MLP:
            default_layers = PromptEncoderConfig.encoder_num_layers
            if config.encoder_num_layers != default_layers:
                warnings.warn(
                    f"for {PromptEncoderReparameterizationType.MLP.value}, the argument `encoder_num_layers` is "
                    f"ignored. Exactly {default_layers} MLP layers are used."
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(self.input_size, self.hidden_size),
                nn.ReLU(),
                nn.Linear(self.hidden_size, self.hidden_size),
                nn.ReLU(),
                nn.Linear(self.hidden_size, self.output_size),
            )
        else:
            raise ValueError(_UNKNOWN_TYPE)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        input_embeds = self.embedding(indices)
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            return self.mlp_head(self.lstm_head(input_embeds)[0])
        if self.encoder_type == PromptEncoderReparameterizationType.MLP:
            return self.mlp_head(input_embeds)
        raise ValueError(_UNKNOWN_TYPE)
