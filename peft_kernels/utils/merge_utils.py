"""Task-vector merging (PEFT's ``peft.utils.merge_utils``): how ``add_weighted_adapter`` combines adapters.

Every function takes n task tensors t_i of one shape and weights w (n,), and returns one tensor of that shape:

    task_arithmetic   Σ_i w_i t_i
    magnitude_prune   Σ_i w_i top_k(t_i)                    top_k keeps the ⌊density·numel⌋ largest |t|
    dare_linear       Σ_i w_i (m_i ⊙ t_i) / density         m_i ~ Bernoulli(density), drawn per tensor in order
    ties              disjoint_merge(w ⊙ top_k(t), sign)
    dare_ties         disjoint_merge(w ⊙ dare(t), sign)

with ``disjoint_merge(x, sign) = Σ_i [sign(t_i) = s*] x_i / max(1, #{i: sign(t_i) = s*})`` where the majority sign
s* is sign(Σ_i t_i) ("total") or sign(Σ_i sign(t_i)) ("frequency"), ties going to +1. The Bernoulli masks use
torch's global generator, drawn in the same order as PEFT, so a seeded merge reproduces PEFT's weights.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` (n,) viewed as (n, 1, …, 1) to broadcast against stacked ``task_tensors`` (n, *shape)."""
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zeroes all but the ⌊density·numel⌋ entries of largest magnitude."""
    keep = int(density * tensor.numel())
    flat_mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    flat_mask[tensor.abs().reshape(-1).topk(keep).indices] = 1
    return tensor * flat_mask.view(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keeps each entry with probability ``density`` (divided by it when ``rescale``: unbiased in expectation)."""
    kept = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return kept / density if rescale else kept


def prune(
    tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False
) -> torch.Tensor:
    """``magnitude`` or ``random`` pruning to ``density`` ∈ [0, 1); density ≥ 1 keeps everything (with a warning)."""
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return tensor
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown method {method}")


def calculate_majority_sign_mask(
    tensor: torch.Tensor, method: Literal["total", "frequency"] = "total"
) -> torch.Tensor:
    """[sign(t_i) = s*] over stacked tensors (n, *shape); s* as in the module docstring."""
    sign = tensor.sign()
    if method == "total":
        votes = tensor.sum(dim=0)
    elif method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    return sign == torch.where(votes >= 0, 1, -1)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tensors that agree with the majority sign (0 where none does)."""
    agreeing = (task_tensors * majority_sign_mask).sum(dim=0)
    return agreeing / majority_sign_mask.sum(dim=0).clamp(min=1.0)


def _weighted(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(task_tensors, dim=0)
    return stacked * reshape_weight_task_tensors(stacked, weights)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    return _weighted(task_tensors, weights).sum(dim=0)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    pruned = [prune(t, density, method="magnitude") for t in task_tensors]
    return _weighted(pruned, weights).sum(dim=0)


def ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    pruned = [prune(t, density, method="magnitude") for t in task_tensors]
    mask = calculate_majority_sign_mask(torch.stack(pruned, dim=0), method=majority_sign_method)
    return disjoint_merge(_weighted(pruned, weights), mask)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    pruned = [prune(t, density, method="random", rescale=True) for t in task_tensors]
    return _weighted(pruned, weights).sum(dim=0)


def dare_ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    pruned = [prune(t, density, method="random", rescale=True) for t in task_tensors]
    mask = calculate_majority_sign_mask(torch.stack(pruned, dim=0), method=majority_sign_method)
    return disjoint_merge(_weighted(pruned, weights), mask)
