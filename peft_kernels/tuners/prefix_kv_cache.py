"""``PrefixKVCache``: a transformers ``DynamicCache`` whose layers live in preallocated buffers (``layers/prefix.py``).

    cache = PrefixKVCache(prefix, batch_size=B, max_cache_len=P + T_max)   # prefix [L, 2, Hkv, P, hd]
    # one prefix_kv_fill call: K_l[:, :, :P] = prefix[l, 0], V_l[:, :, :P] = prefix[l, 1] for all l, b
    keys, values = cache.update(k, v, layer_idx)      # kv_append at rows n … n+T-1 → views [:, :, :n+T]

When autograd records and the prefix requires grad (a training forward), each layer instead starts as the
broadcast prefix and its one update is a ``torch.cat`` (``layers/prefix.py``): the same rows written once.

It answers transformers' cache protocol (``Cache`` / ``CacheLayerMixin`` of transformers 5.23 and 5.24) exactly as
a ``DynamicCache`` holding the prefix does: ``get_seq_length`` = P + tokens seen, ``get_mask_sizes`` =
(n + q, 0) so masks and positions start at P, ``crop`` with a negative count, ``reorder_cache`` for beam search,
``batch_select_indices`` / ``batch_repeat_interleave``, ``reset``, offloading, ``is_compileable`` False (its
shapes grow, as a ``DynamicCache``'s do). It subclasses ``DynamicCache`` so code that checks for one (and PEFT
users who do) keep working; ``cache.layers[l].keys`` is the valid view ``[B, Hkv, n, hd]``.

Differences a caller can observe: the returned keys/values are views of a larger buffer, and ``crop`` or
``reorder_cache`` rewrite rows in place, so a view taken *before* one of them can change afterwards (a
``DynamicCache`` would have handed out a fresh tensor). Views handed out while autograd records are protected:
the next write goes to a copy (``layers/prefix.py``).

This module imports transformers at import time; ``tuners/prefix_cache_builder.py`` imports it lazily.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..layers.prefix import KVBuffer, prefix_kv_buffers


class PrefixKVLayer(DynamicLayer):
    """One decoder layer's cache: a ``KVBuffer`` (K, V [B, Hkv, S, hd], rows [0, n) valid)."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, buffer: KVBuffer | None = None, backend: str | None = None):
        # CacheLayerMixin.__init__ would assign keys/values, which are properties here.
        self.buffer = buffer
        self.backend = backend
        self.is_initialized = buffer is not None
        if buffer is not None:
            self.dtype, self.device = buffer.dtype, buffer.device

    # ------------------------------------------------------------------ keys / values as views
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.buffer is None else self.buffer.views()[0]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._assign(0, value)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.buffer is None else self.buffer.views()[1]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._assign(1, value)

    def _assign(self, index: int, value: torch.Tensor | None) -> None:
        """``layer.keys = t`` (offloading code, user code): t becomes the whole buffer, n = its length."""
        if value is None:
            self.buffer, self.is_initialized = None, False
            return
        if self.buffer is None:
            self.buffer = KVBuffer(value, value, value.shape[2], self.backend)
        keys = value if index == 0 else self.buffer.k_buf
        values = value if index == 1 else self.buffer.v_buf
        self.buffer.assign(keys, values)

    # ------------------------------------------------------------------ protocol
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # An empty buffer (after reset, or a cache built without a prefix): the first append sizes it exactly.
        batch, heads, _, head_dim = key_states.shape
        keys = key_states.new_empty((batch, heads, 0, head_dim))
        values = value_states.new_empty((batch, heads, 0, value_states.shape[3]))
        self.buffer = KVBuffer(keys, values, 0, self.backend)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Appends [B, Hkv, T, hd] at rows n … n+T-1 (``ops.kv_append``) and returns the views [:, :, :n+T]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.buffer.append(key_states, value_states)
        self.dtype = self.buffer.dtype
        return keys, values

    def get_seq_length(self) -> int:
        return self.buffer.length if self.is_initialized and self.buffer is not None else 0

    def get_max_length(self) -> int:
        return -1  # grows on demand, as a DynamicLayer

    def reset(self) -> None:
        self.buffer, self.is_initialized = None, False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.buffer.crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self.buffer.reorder(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self.buffer.repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.buffer.select_batch(indices)

    def offload(self) -> None:
        if self.is_initialized:
            keys, values = self.buffer.views()
            self.buffer.assign(keys.to("cpu", non_blocking=True), values.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.buffer.device != self.device:
            keys, values = self.buffer.views()
            self.buffer.assign(keys.to(self.device, non_blocking=True), values.to(self.device, non_blocking=True))


class PrefixKVCache(DynamicCache):
    """A ``DynamicCache`` that starts with the prefix [L, 2, Hkv, P, hd] in preallocated per-layer buffers.

    Args:
        prefix: (L, 2, Hkv, P, hd) in the model's dtype; may require grad (dprefix = Σ_b dK_l[b, :, :P]).
            None: an empty cache whose layers are created on first update (as ``DynamicCache()``).
        batch_size: B.
        max_cache_len: rows to preallocate per layer, P + T_max (T_max: input tokens, plus the new ones when
            generating); None or too small: the buffers are sized on the first update and grow when exceeded.
        backend: backend of the prefix ops ("reference", "triton", "cuda"; None: automatic).
    """

    def __init__(
        self,
        prefix: torch.Tensor | None = None,
        batch_size: int = 1,
        max_cache_len: int | None = None,
        backend: str | None = None,
    ):
        self.backend = backend
        if prefix is None:
            Cache.__init__(self, layer_class_to_replicate=PrefixKVLayer)
            return
        buffers = prefix_kv_buffers(prefix, batch_size, max_cache_len, backend=backend)
        Cache.__init__(self, layers=[PrefixKVLayer(buffer, backend) for buffer in buffers])
