"""Preallocated prefix key/value buffers: the storage behind ``tuners/prefix_kv_cache.PrefixKVCache``.

Shapes (``L`` layers, ``B`` batch, ``Hkv`` key/value heads, ``P`` virtual tokens, ``hd`` head dim, ``S`` rows)::

    prefix      [L, 2, Hkv, P, hd]        unbatched (prefix[l, 0] keys, prefix[l, 1] values of layer l)
    storage     [L, 2, B, Hkv, S, hd]     one allocation, S = P + T_max (input tokens, plus new tokens in generate)
    K_l, V_l    [B, Hkv, S, hd]           storage[l, 0], storage[l, 1]: transformers' cache layout
    valid rows  0 … n_l - 1               the prefix (0 … P-1), then the tokens appended so far

Per forward without autograd (generation, evaluation): ``prefix_kv_buffers`` writes the prefix into every layer
with ONE ``ops.prefix_kv_fill`` call (broadcast over B), then each layer's ``KVBuffer.append`` runs
``ops.kv_append`` (rows ``n … n+T-1``, in place) and returns the views ``K_l[:, :, :n+T]``, so no decode step
re-concatenates the cache (a ``DynamicCache`` ``torch.cat`` allocates and copies ``n+T`` rows per layer per step).
A forward that records autograd appends once per layer: each buffer starts as a view of the broadcast prefix and
that append is one ``torch.cat`` (``_borrowed_prefix_buffers``; the same bytes, no Python autograd per layer).

On accelerators one allocation holds every layer, which keeps the fill a single launch (equal layer strides), and
each ``K_l``/``V_l`` is taken from it with ``.data``; on the CPU every ``K_l`` and ``V_l`` is its own allocation (see
``prefix_kv_buffers``). Either way each has its own autograd version counter: an in-place write to layer l must not
invalidate views of layer l' < l that attention saved for backward (views of one base share the base's counter).

Never silently wrong: when an append does not fit (more rows than S, a wider dtype, another device) the buffer is
reallocated (``_REGROW`` more rows, contents copied by ``kv_append``, differentiably); when views handed out while
recording autograd could still be saved for a backward, the next in-place write first moves to a fresh buffer
(copy-on-write), which is what ``torch.cat`` gives ``DynamicCache`` for free. Rows past ``n`` are never read.
No transformers import here (docs/ARCHITECTURE.md §3).
"""

from __future__ import annotations

import torch

from ..ops.prefix import append_checked, fill_checked, kv_append

# Growth when an append overflows a buffer that has already been appended to (a decode loop past the planned
# length): 1.5x the rows, at least this many more, so the copies amortize to O(1) per token.
_REGROW_MIN_ROWS = 64


class KVBuffer:
    """One layer's K, V buffers [B, Hkv, S, hd] of which rows [0, length) are valid.

    ``append(k, v)`` writes k, v [B, Hkv, T, hd] at rows length … length+T-1 and returns (K[:, :, :length+T],
    V[:, :, :length+T]) (the buffers themselves when full, so autograd records no slice). Dtype follows
    ``torch.cat``: an append of a wider dtype promotes the buffer; a narrower one is cast up.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int, backend: str | None = None):
        self.k_buf, self.v_buf, self.length = keys, values, int(length)
        # Rows at or past the high-water mark were never written into this buffer: appends there can tell
        # kv_append (fresh_rows) that no gradient flows out of the rows they overwrite.
        self._high_water = int(length)
        self.backend = backend
        self.appends = 0
        # True once views were handed out while autograd recorded: an in-place write could then break a backward.
        self._exposed = False

    # -------------------------------------------------------------------- shape
    @property
    def capacity(self) -> int:
        return self.k_buf.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k_buf.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.k_buf.dtype

    @property
    def device(self) -> torch.device:
        return self.k_buf.device

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K[:, :, :length], V[:, :, :length]), the buffers themselves when every row is valid."""
        if torch.is_grad_enabled() and (self.k_buf.requires_grad or self.v_buf.requires_grad):
            self._exposed = True
        if self.length == self.k_buf.shape[2]:
            return self.k_buf, self.v_buf
        # narrow: the view [:, :, :length] at a fraction of the cost of Python indexing (per layer and step)
        return self.k_buf.narrow(2, 0, self.length), self.v_buf.narrow(2, 0, self.length)

    # -------------------------------------------------------------------- writes
    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K[:, :, n:n+T] = k, V[:, :, n:n+T] = v (n = length), in place unless a reallocation is due; → views."""
        k_buf = self.k_buf
        batch, heads, capacity, head_dim = k_buf.shape
        k_shape = k.shape
        if len(k_shape) != 4 or (k_shape[0], k_shape[1], k_shape[3]) != (batch, heads, head_dim) or v.shape != k_shape:
            raise ValueError(
                f"new keys/values {tuple(k.shape)}/{tuple(v.shape)} do not extend a cache of ({batch}, {heads}, "
                f"{self.length}, {head_dim})"
            )
        dtype = k_buf.dtype
        if k.dtype != dtype or v.dtype != dtype:
            dtype = torch.promote_types(torch.promote_types(dtype, k.dtype), v.dtype)
        need = self.length + k_shape[2]
        # is_cpu first: comparing .device builds two torch.device objects (per layer and step, CPU the common case)
        moved = k.is_cpu != k_buf.is_cpu or (not k.is_cpu and k.device != k_buf.device)
        if k.dtype != dtype or v.dtype != dtype:
            k, v = k.to(dtype), v.to(dtype)
        if need > capacity or dtype != k_buf.dtype or moved or self._exposed:
            if need > capacity:
                # The first append sizes an unplanned buffer exactly; later ones (decoding past the plan) grow 1.5x.
                grow = max(capacity // 2, _REGROW_MIN_ROWS) if self.appends > 0 else 0
                capacity = max(need, capacity + grow)
            if capacity == need:
                # The new buffer is exactly the old rows then the new ones: one concatenation writes it (one pass,
                # autograd's own node), where a copy of the old rows then an append would be two ops. This is every
                # layer of a forward that records autograd (see prefix_kv_buffers) and every first append of an
                # unplanned cache.
                self._concatenate(k, v)
                return self.views()
            self._reallocate(capacity, dtype, k.device)
        fresh = self.length >= self._high_water
        # The checks of ops.kv_append hold by construction here (shape checked above; dtype, device, rows made so).
        append_checked(self.k_buf, self.v_buf, k, v, self.length, self.backend, fresh)
        self.length = need
        if need > self._high_water:
            self._high_water = need
        self.appends += 1
        return self.views()

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last ``-tokens_to_remove`` rows (a negative count, as transformers' ``DynamicLayer.crop``)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        # Rows stay allocated and are overwritten by the next append; a view taken before keeps its rows until then.
        self.length = max(0, self.length + tokens_to_remove)

    def reorder(self, index: torch.Tensor) -> None:
        """Batch rows ← rows ``index`` (beam search), same batch size: rows [0, length) rewritten in place."""
        if self.length == 0:
            return
        if self._exposed:
            self._reallocate(self.capacity, self.dtype, self.device)
        index = index.to(self.device)
        with torch.no_grad():  # beam search runs without gradients; the gather is a temporary of `length` rows
            self.k_buf[:, :, : self.length].copy_(self.k_buf[:, :, : self.length].index_select(0, index))
            self.v_buf[:, :, : self.length].copy_(self.v_buf[:, :, : self.length].index_select(0, index))

    def select_batch(self, index: torch.Tensor) -> None:
        """Batch rows ← rows ``index`` (any length, repeats allowed): new buffers of the same capacity."""
        keys, values = self.views()
        index = index.to(self.device)
        self._replace(keys.index_select(0, index), values.index_select(0, index), self.capacity)

    def repeat_interleave(self, repeats: int) -> None:
        keys, values = self.views()
        self._replace(keys.repeat_interleave(repeats, dim=0), values.repeat_interleave(repeats, dim=0), self.capacity)

    def assign(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Takes ``keys``/``values`` [B, Hkv, n, hd] as the whole buffer (n valid rows); used by offloading code."""
        self.k_buf, self.v_buf, self.length = keys, values, keys.shape[2]
        self._high_water = self.length
        self._exposed = True  # someone else holds these tensors: never write into them in place

    # -------------------------------------------------------------------- reallocation
    def _concatenate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fresh buffers [old rows ; k] and [old rows ; v], exactly full, in k's dtype and on k's device."""
        keys, values = self.views()
        if keys.dtype != k.dtype or keys.device != k.device:
            keys, values = keys.to(device=k.device, dtype=k.dtype), values.to(device=k.device, dtype=v.dtype)
        self.k_buf = torch.cat((keys, k), 2)
        self.v_buf = torch.cat((values, v), 2)
        self.length = self._high_water = self.k_buf.shape[2]
        self._exposed = False
        self.appends += 1

    def _reallocate(self, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        keys, values = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]
        self._replace(keys.to(device=device, dtype=dtype), values.to(device=device, dtype=dtype), capacity)

    def _replace(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """Fresh buffers of ``capacity`` rows holding ``keys``/``values`` in rows [0, n) (a differentiable copy)."""
        batch, heads, rows, head_dim = keys.shape
        capacity = max(capacity, rows)
        new_k = keys.new_empty((batch, heads, capacity, head_dim))
        new_v = values.new_empty((batch, heads, capacity, values.shape[3]))
        self.k_buf, self.v_buf = kv_append(new_k, new_v, keys, values, 0, backend=self.backend, fresh_rows=True)
        self.length = rows
        self._high_water = rows
        self._exposed = False


def prefix_kv_buffers(
    prefix: torch.Tensor, batch_size: int, capacity: int | None = None, backend: str | None = None
) -> list[KVBuffer]:
    """One ``KVBuffer`` per layer, rows [0, P) = the prefix broadcast over ``batch_size``, written by one op call.

    Args:
        prefix: (L, 2, Hkv, P, hd), may require grad (then dprefix = Σ_b dK_l[b, :, :P] through the op).
        batch_size: B.
        capacity: rows S per buffer (P + T_max); None or less than P → P (the first append then sizes it).
        backend: forwarded to the ops (None: ``PEFT_KERNELS_BACKEND``, then the best available).
    Returns: L buffers with length P.
    """
    n_layers, _, heads, prefix_len, head_dim = prefix.shape
    if prefix.requires_grad and torch.is_grad_enabled():
        return _borrowed_prefix_buffers(prefix, batch_size, backend)
    rows = max(int(capacity or 0), prefix_len)
    if prefix.is_cpu:
        # Separate allocations per layer and per K/V on the CPU: a single buffer for all layers is usually above
        # glibc's mmap threshold (32 MiB at most), so every forward would map fresh pages and fault them in (the op
        # benchmark's gpt2 B=4 T=128 P=16 training step ran 2x slower so); these are reused from the heap, and each
        # fresh tensor has its own version counter already (no .data view per buffer).
        # Allocated in the order the fill writes them (k_0, v_0, k_1, …), so one layer's pair is adjacent in the heap.
        shape = (batch_size, heads, rows, head_dim)
        bufs = [prefix.new_empty(shape) for _ in range(2 * n_layers)]
        k_bufs, v_bufs = bufs[0::2], bufs[1::2]
    else:
        # One allocation on accelerators (their caching allocators reuse it): one fill launch for every layer.
        # .data: same memory, own version counter per layer and per K/V (see the module docstring).
        storage = prefix.new_empty((n_layers, 2, batch_size, heads, rows, head_dim))
        k_bufs = [layer_kv.data for layer_kv in storage[:, 0].unbind(0)]
        v_bufs = [layer_kv.data for layer_kv in storage[:, 1].unbind(0)]
    # The checks of ops.prefix_kv_fill hold by construction (buffers made from the prefix's shape, dtype, device).
    fill_checked(prefix, k_bufs, v_bufs, backend)
    return [KVBuffer(k, v, prefix_len, backend) for k, v in zip(k_bufs, v_bufs)]


def _borrowed_prefix_buffers(prefix: torch.Tensor, batch_size: int, backend: str | None) -> list[KVBuffer]:
    """Buffers that start as views of the prefix broadcast over the batch (no copy, never written in place).

    A forward that records autograd (training) appends to each layer once, so nothing is gained by preallocating:
    each layer's append is then ``KVBuffer._concatenate``, one ``torch.cat`` writing the P + T rows once (the bytes
    of the fill plus the append), with autograd's own backward node: dk = dK[:, :, P:] (a view), and
    dprefix[l] = Σ_b dK_l[b, :, :P] from the expand. The prefill op and its append op would cost two Python
    autograd Functions and two custom-op calls per layer for the same writes (docs/KERNELS.md §8).
    """
    # One unbind of [L·2, Hkv, P, hd] (a view of the prefix): one backward node stacks the 2L prefix gradients.
    per_layer = prefix.flatten(0, 1).unbind(0)
    shape = (batch_size, -1, -1, -1)
    buffers = []
    for keys, values in zip(per_layer[0::2], per_layer[1::2]):
        buffer = KVBuffer(keys.unsqueeze(0).expand(shape), values.unsqueeze(0).expand(shape), keys.shape[1], backend)
        buffer._exposed = True  # views of the prefix: the first append concatenates, never writes into them
        buffers.append(buffer)
    return buffers
