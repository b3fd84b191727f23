"""PrefixEncoder: the learned key/value prefix of prefix tuning (PEFT 0.21.2 parameter names and shapes)."""

from __future__ import annotations

import torch
from torch import nn


class PrefixEncoder(nn.Module):
    """prefix = embedding(idx)  or, with ``prefix_projection``,  prefix = transform(embedding(idx)).

    Shapes (``P`` num_virtual_tokens, ``L`` num_layers, ``D`` token_dim after the GQA adjustment,
    ``Eh`` encoder_hidden_size)::

        embedding  Embedding(P, L·2·D)                    no projection, or projection in inference mode
        embedding  Embedding(P, D)                         projection while training
        transform  Linear(D, Eh) → Tanh → Linear(Eh, L·2·D)
        forward    idx (..., P) long → (..., P, L·2·D)

    In inference mode the projection is not built: a saved checkpoint holds the projection's *output*
    (``prompt_embeddings``), which is loaded straight into ``embedding``. ``init_weights="zero"`` zeroes the
    last projection (weight and bias), or the embedding when there is no projection.
    """

    def __init__(self, config):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        token_dim = config.token_dim
        out_dim = config.num_layers * 2 * token_dim
        if self.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(config.num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, out_dim),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, out_dim)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        # ``transform`` exists only when projecting while training; in inference mode the embedding already holds
        # the projected rows, so the attribute check (not the flag) decides.
        if self.prefix_projection and hasattr(self, "transform"):
            return self.transform(self.embedding(prefix))
        return self.embedding(prefix)

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        """embedding.weight ← prompt_embeddings (P, L·2·D); only meaningful without a trainable projection."""
        if hasattr(self, "transform"):
            raise ValueError("Cannot load flattened prompt embeddings when `prefix_projection=True`.")
        if prompt_embeddings.shape != self.embedding.weight.shape:
            raise ValueError(
                f"Invalid `prompt_embeddings` shape. Expected {tuple(self.embedding.weight.shape)}, got "
                f"{tuple(prompt_embeddings.shape)}."
            )
        with torch.no_grad():
            self.embedding.weight.copy_(prompt_embeddings.to(self.embedding.weight.device))
