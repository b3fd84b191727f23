"""Mixed-adapter batches (PEFT's ``adapter_names=``): adapter names → row indices, and the grouped update.

A batch carries one adapter name per sample (``"__base__"``: none). A layer turns the names into
``row_adapter`` (B,) int64, the index of each sample's adapter in the layer's ``adapters`` tuple or -1, and then
either calls the fused ``ops.lora_linear_mixed`` (lora.Linear) or runs ``add_grouped_updates`` (every other
layer type: its own update formula on each adapter's rows, gathered with one index tensor per adapter).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from .. import ops

BASE = "__base__"


@functools.lru_cache(maxsize=64)
def _row_adapter_cached(names: tuple[str, ...], adapters: tuple[str, ...], device: torch.device) -> torch.Tensor:
    index = {name: i for i, name in enumerate(adapters)}
    return torch.tensor([index.get(name, -1) for name in names], dtype=torch.int64, device=device)


def row_adapter_for(
    adapter_names: Sequence[str], known: Sequence[str], device: torch.device
) -> tuple[tuple[str, ...], torch.Tensor]:
    """(adapters, row_adapter): the layer's adapters used by the batch (sorted, ``"__base__"`` and names this
    layer does not hold excluded, as PEFT's layers skip them) and each sample's index into them, -1 for none.

    Cached per (names, adapters, device): every layer of a forward and every step of ``generate`` reuse one
    index tensor instead of copying it to the device per layer.
    """
    names = tuple(adapter_names)
    adapters = tuple(sorted({name for name in names if name != BASE and name in known}))
    return adapters, _row_adapter_cached(names, adapters, torch.device(device))


def add_grouped_updates(
    result: torch.Tensor,
    x: torch.Tensor,
    adapter_names: Sequence[str],
    known: Sequence[str],
    update: Callable[[torch.Tensor, str], torch.Tensor],
) -> torch.Tensor:
    """result[rows of a] += update(x[rows of a], a) for each adapter a of the batch, in result's dtype.

    ``result`` is the base layer's fresh output (changed in place); x and result share their first axis.
    """
    adapters, row_adapter = row_adapter_for(adapter_names, known, x.device)
    for index, adapter in enumerate(adapters):
        rows = torch.nonzero(row_adapter == index).squeeze(1)
        result.index_add_(0, rows, update(x.index_select(0, rows), adapter).to(result.dtype))
    return result


def linear_mixed_forward(layer, x: torch.Tensor, args, kwargs, adapter_names: Sequence[str]) -> torch.Tensor:
    """lora.Linear (nn.Linear or Conv1D base) on a mixed batch: one ``ops.lora_linear_mixed`` call, the base GEMM
    and every sample's own low-rank update, where the layer's fused path applies (``Linear._fused_operands``: a
    plain, hook-free base, adapters read directly); else, or with dropout training or autocast on, the grouped
    eager path of ``LoraLayer._mixed_batch_forward``."""
    adapters, row_adapter = row_adapter_for(adapter_names, layer.lora_A, x.device)
    base = layer.base_layer
    operands = None
    if not (args or kwargs or torch.is_autocast_enabled(x.device.type)):
        operands = layer._fused_operands(base, list(adapters))
    if operands is None or operands[-1]:  # the last operand: whether an adapter's dropout trains
        result = base(x, *args, **kwargs)
        return add_grouped_updates(result, x, adapter_names, layer.lora_A, layer._eager_lora_update)
    weight, bias, lora_a, lora_b, lora_b_bias, scales, _dropout_p, _training = operands
    return ops.lora_linear_mixed(x, weight, bias, lora_a, lora_b, scales, row_adapter, lora_b_bias_list=lora_b_bias)
