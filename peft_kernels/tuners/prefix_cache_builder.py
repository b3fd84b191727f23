"""The prefix-tuning key/value cache: one place that turns the unbatched prefix into a transformers ``Cache``.

Layout (``L`` num_layers, ``P`` num_virtual_tokens, ``Hkv`` key/value heads, ``hd`` head dim, ``D = Hkv·hd``)::

    encoder output   flat [P, L·2·D]         one row per virtual token: [l0.key, l0.value, l1.key, l1.value, …]
    unbatched prefix [L, 2, Hkv, P, hd]      prefix[l, 0] = keys of layer l, prefix[l, 1] = values
    cache layer l    keys/values [B, Hkv, P, hd], every batch row the same prefix

The prefix is built once per forward without a batch dimension and broadcast (``expand``) over the batch, so the
encoder runs on P tokens instead of B·P and autograd's expand-backward gives ``dprefix = Σ_b dK[b, :, :P]``, the
same gradient PEFT gets from B identical encoder calls.

Two cache paths, chosen by ``build_prefix_cache`` (``PEFT_KERNELS_PREFIX_CACHE``, read per call):

- ``fused`` (default) for decoder-only models and task heads (one transformer submodule, not Gemma-2/3/4):
  ``PrefixKVCache`` (``prefix_kv_cache.py``) preallocates [B, Hkv, P + T_max, hd] per layer, writes the prefix
  with one ``ops.prefix_kv_fill`` call and appends new K/V in place with ``ops.kv_append``; a forward that
  records autograd (one append per layer) concatenates each layer's prefix and new rows once instead;
- ``dynamic``, and always for encoder-decoder models and Gemma-2/3/4 (the reference path): a transformers
  ``DynamicCache`` / ``EncoderDecoderCache`` holding the broadcast prefix, which ``torch.cat``s every update.
"""

from __future__ import annotations

import os
import warnings

import torch

# Model types whose caches PEFT builds from the model config (per-layer KV shapes, sliding windows, shared KV).
_CONFIG_CACHE_MODEL_TYPES = ("gemma2", "gemma3_text", "gemma4")

PREFIX_CACHE_ENV = "PEFT_KERNELS_PREFIX_CACHE"
PREFIX_CACHE_MODES = ("fused", "dynamic")


def prefix_cache_mode() -> str:
    """``fused`` (preallocated buffers, the default) or ``dynamic`` (transformers' DynamicCache), from the env."""
    mode = os.environ.get(PREFIX_CACHE_ENV, "").strip().lower() or "fused"
    if mode not in PREFIX_CACHE_MODES:
        raise ValueError(f"{PREFIX_CACHE_ENV}={mode!r}; expected one of {', '.join(PREFIX_CACHE_MODES)}.")
    return mode


def unbatched_prefix(flat: torch.Tensor, num_layers: int, num_heads: int) -> torch.Tensor:
    """flat [P, L·2·D] → prefix [L, 2, H, P, hd] with hd = D // H (a view, no copy)."""
    num_tokens = flat.shape[0]
    head_dim = flat.shape[1] // (num_layers * 2 * num_heads)
    # [P, L·2·D] → [P, L, 2, H, hd] (row layout above) → [L, 2, H, P, hd]
    return flat.view(num_tokens, num_layers, 2, num_heads, head_dim).permute(1, 2, 3, 0, 4)


def seq2seq_layer_slots(num_layers: int) -> list[int]:
    """Prefix layer used by decoder layer i of an encoder-decoder model: ``2i mod L``.

    PEFT 0.21.2 doubles the per-layer K/V stack for two transformer submodules and splits it into chunks of
    four (self key, self value, cross key, cross value); chunk i then starts at slot 4i of the doubled stack, i.e.
    layer ``2i mod L`` of the original one, and its cross pair is discarded. Reproduced so checkpoints trained with
    PEFT give the same outputs (for L = 2 both decoder layers read prefix layer 0).
    """
    return [(2 * i) % num_layers for i in range(num_layers)]


def build_prefix_cache(
    prefix: torch.Tensor,
    batch_size: int,
    num_transformer_submodules: int = 1,
    model_config=None,
    max_cache_len: int | None = None,
):
    """The cache a prefix-tuned forward starts from: every layer holds ``prefix`` broadcast over the batch.

    Args:
        prefix: [L, 2, Hkv, P, hd], already in the model's dtype; may require grad.
        batch_size: B.
        num_transformer_submodules: 1 → ``DynamicCache`` with ``get_seq_length() == P``; 2 (encoder-decoder) →
            ``EncoderDecoderCache`` whose self-attention cache holds the prefix (layer slots of
            ``seq2seq_layer_slots``) and whose cross-attention cache is empty with every ``is_updated`` False, so
            the prefix reaches decoder self-attention only and cross-attention is computed from the encoder.
        model_config: the base model's config; Gemma-2/3/4 get a config-built ``DynamicCache`` (per-layer shapes).
        max_cache_len: P + T_max, the rows the fused cache preallocates per layer (T_max: the forward's input
            length, or the prompt plus new tokens in ``generate``); None: sized by the first update, grown after.
    Returns: a fresh cache; transformers appends the real tokens' K/V to it. ``PrefixKVCache`` (a ``DynamicCache``
    subclass) for one submodule and no Gemma unless ``PEFT_KERNELS_PREFIX_CACHE=dynamic``; else as described.
    """
    from transformers import DynamicCache, EncoderDecoderCache

    num_layers = prefix.shape[0]
    model_type = getattr(model_config, "model_type", "") or ""
    if any(name in model_type for name in _CONFIG_CACHE_MODEL_TYPES):
        return _config_cache(prefix, batch_size, model_config)
    if num_transformer_submodules == 1 and prefix_cache_mode() == "fused":
        from .prefix_kv_cache import PrefixKVCache

        return PrefixKVCache(prefix, batch_size, max_cache_len)

    def layer_kv(layer: int):
        # [Hkv, P, hd] → [B, Hkv, P, hd] without a copy; the cache's first cat materialises it.
        keys = prefix[layer, 0].unsqueeze(0).expand(batch_size, -1, -1, -1)
        values = prefix[layer, 1].unsqueeze(0).expand(batch_size, -1, -1, -1)
        return keys, values

    if num_transformer_submodules == 1:
        return DynamicCache([layer_kv(layer) for layer in range(num_layers)])
    self_cache = DynamicCache([layer_kv(slot) for slot in seq2seq_layer_slots(num_layers)])
    cache = EncoderDecoderCache(self_cache, DynamicCache())
    # The virtual tokens never enter the encoder: cross-attention K/V must be computed on the first decoder step.
    cache.is_updated = dict.fromkeys(range(num_layers), False)
    return cache


def _layer_kv_target_shape(text_config, layer_idx: int) -> tuple[int, int] | None:
    """(num_kv_heads, head_dim) that layer ``layer_idx`` expects, or None when all layers share the global shape."""
    layer_types = getattr(text_config, "layer_types", None)
    if not layer_types:
        return None
    per_layer = getattr(text_config, "per_layer_config", None)
    if per_layer is not None:
        layer_cfg = per_layer[layer_idx]
        return layer_cfg.num_key_value_heads, layer_cfg.head_dim
    global_head_dim = getattr(text_config, "global_head_dim", None)
    if global_head_dim is None:
        return None
    sliding = layer_types[layer_idx] == "sliding_attention"
    head_dim = text_config.head_dim if sliding else global_head_dim
    global_kv = getattr(text_config, "num_global_key_value_heads", None)
    num_kv = global_kv if (not sliding and global_kv is not None) else text_config.num_key_value_heads
    return num_kv, head_dim


def _config_cache(prefix: torch.Tensor, batch_size: int, model_config):
    """Gemma-2/3/4: a ``DynamicCache(config=…)`` filled layer by layer, heads/head_dim sliced to each layer's shape.

    Layers whose KV is wider than the provisioned prefix, and KV-shared layers (which never write a cache), are
    skipped with a warning; skipping every layer is an error.
    """
    from transformers import DynamicCache

    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    cache = DynamicCache(config=text_config)
    num_layers, _, num_heads, num_tokens, head_dim = prefix.shape
    cache_position = torch.arange(num_tokens, device=prefix.device)
    num_shared = getattr(text_config, "num_kv_shared_layers", 0) or 0
    first_shared = getattr(text_config, "num_hidden_layers", num_layers) - num_shared
    injected, skipped = [], []
    for layer in range(num_layers):
        if num_shared > 0 and layer >= first_shared:
            skipped.append(layer)
            continue
        keys = prefix[layer, 0].unsqueeze(0).expand(batch_size, -1, -1, -1)
        values = prefix[layer, 1].unsqueeze(0).expand(batch_size, -1, -1, -1)
        target = _layer_kv_target_shape(text_config, layer)
        if target is not None:
            layer_heads, layer_head_dim = target
            if layer_heads > num_heads or layer_head_dim > head_dim:
                skipped.append(layer)
                continue
            keys = keys[:, :layer_heads, :, :layer_head_dim]
            values = values[:, :layer_heads, :, :layer_head_dim]
        cache.update(keys, values, layer, cache_kwargs={"cache_position": cache_position})
        injected.append(layer)
    if not injected:
        raise ValueError(
            "Prefix tuning skipped every layer because no layer's KV shape matched the provisioned prefix "
            f"(num_attention_heads={num_heads}, head_dim={head_dim}). Override `token_dim` and `num_attention_heads` "
            "in `PrefixTuningConfig` to match a layer that should receive the prefix."
        )
    if skipped:
        warnings.warn(
            f"Prefix tuning injected into layers {injected}; skipped {skipped} due to KV shape mismatch or shared-KV "
            "layers."
        )
    return cache
