"""PromptEmbedding: prompt tuning's virtual-token embeddings with RANDOM / SAMPLE_VOCAB / TEXT init."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import PromptTuningInit


class PromptEmbedding(nn.Module):
    """prompts = embedding(idx);  embedding: Embedding(N, D),  N = num_virtual_tokens · num_transformer_submodules.

    Initialisation (skipped in inference mode, where a checkpoint overwrites the rows anyway):

    - ``RANDOM``: ``nn.Embedding``'s N(0, 1).
    - ``SAMPLE_VOCAB``: rows ``word_embeddings(randint(0, vocab, (N,)))`` (draws from torch's global RNG).
    - ``TEXT``: ``ids = tokenizer(prompt_tuning_init_text)["input_ids"]`` (special tokens included), truncated to
      ``N`` or repeated ``ceil(N / len(ids))`` times and truncated; rows ``word_embeddings(ids)``.

    Copied rows are detached and stored as fp32 whatever the base model's dtype.
    """

    def __init__(self, config, word_embeddings: nn.Module):
        super().__init__()
        total_virtual_tokens = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total_virtual_tokens, config.token_dim)
        if config.inference_mode:
            return
        init = config.prompt_tuning_init
        if init == PromptTuningInit.SAMPLE_VOCAB:
            vocab_size = word_embeddings.num_embeddings
            token_ids = torch.randint(0, vocab_size, (total_virtual_tokens,), dtype=torch.long)
        elif init == PromptTuningInit.TEXT:
            token_ids = torch.tensor(_text_token_ids(config, total_virtual_tokens), dtype=torch.long)
        else:
            return
        device = word_embeddings.weight.device
        with torch.no_grad():
            rows = word_embeddings(token_ids.to(device)).detach().clone().to(torch.float32)
        self.embedding.weight = nn.Parameter(rows)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def _text_token_ids(config, total_virtual_tokens: int) -> list[int]:
    """The init text's token ids cycled/truncated to exactly ``total_virtual_tokens`` entries."""
    from transformers import AutoTokenizer

    # A checkpoint's config must not be able to run code when its adapter is loaded. Popped from the config's own
    # dict (as PEFT does), so a saved adapter_config.json never carries the flag either.
    tokenizer_kwargs = config.tokenizer_kwargs or {}
    tokenizer_kwargs.pop("trust_remote_code", None)
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **tokenizer_kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(
            f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenizes to no tokens; TEXT init needs at "
            "least one."
        )
    if len(ids) < total_virtual_tokens:
        ids = ids * math.ceil(total_virtual_tokens / len(ids))
    return ids[:total_virtual_tokens]
