"""``LoraModel.add_weighted_adapter``: a new LoRA adapter that combines existing ones (PEFT 0.21.2's semantics).

Per LoRA layer, with adapters i (A_i (r_i, in), B_i (out, r_i), scaling s_i) and user weights w_i:

    cat        A = [w_1 s_1 A_1; …; w_n s_n A_n],  B = [B_1 … B_n]         exact: B A = Σ w_i s_i B_i A_i
    linear, ties, dare_linear, dare_ties, magnitude_prune
               A = merge_fn({A_i}, sign_i √|w_i s_i|),  B = merge_fn({B_i}, √|w_i s_i|)     (all r_i equal)
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
               ΔW = merge_fn({ΔW_i}, w) with ΔW_i = s_i B_i A_i;  U S Vᵀ = svd(ΔW);  B = U_k S_k, A = Vᵀ_k

merge_fn is the function of ``peft_kernels.utils.merge_utils`` the name says (``linear`` = task arithmetic). The
new adapter has r = lora_alpha = the new rank (scaling 1): k = ``svd_rank`` or max r_i for the SVD types, Σ r_i
for ``cat``, the common r otherwise. Conv layers take ΔW flattened to (C_out, C_in·∏k); fan-in-fan-out and
embedding layers transpose it first. The SVD types are deterministic (``torch.linalg.svd`` with ``svd_driver``,
as PEFT passes it on CUDA; the random pruning of the ``dare`` types draws from torch's global generator).
"""

from __future__ import annotations

import math
import operator
from dataclasses import replace
from functools import reduce
from typing import Optional

import torch

from ...layers.lora import LoraLayer
from ...layers.lora_conv import _ConvNd
from ...utils import merge_utils
from ...utils.other import ModulesToSaveWrapper, _get_submodules

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_MERGE_FNS = {
    "linear": lambda t, w, density, sign: merge_utils.task_arithmetic(t, w),
    "ties": lambda t, w, density, sign: merge_utils.ties(t, w, density, sign),
    "dare_linear": lambda t, w, density, sign: merge_utils.dare_linear(t, w, density),
    "dare_ties": lambda t, w, density, sign: merge_utils.dare_ties(t, w, density, sign),
    "magnitude_prune": lambda t, w, density, sign: merge_utils.magnitude_prune(t, w, density),
}


def check_weighted_adapter_args(lora_model, adapters: list[str], combination_type: str, svd_rank: Optional[int]):
    """(combination_type, new rank, new target_modules), or the ValueError/TypeError PEFT raises."""
    for adapter in adapters:
        if adapter not in lora_model.peft_config:
            raise ValueError(f"Adapter {adapter} does not exist")
    for adapter in adapters:
        if lora_model.peft_config[adapter].target_parameters:
            raise ValueError(
                f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter '{adapter}')"
            )
    shared_wrappers = [
        module
        for module in lora_model.modules()
        if isinstance(module, ModulesToSaveWrapper) and sum(a in module.modules_to_save for a in adapters) > 1
    ]
    if shared_wrappers:
        raise ValueError(
            "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
            f"{len(shared_wrappers)} such instance(s)."
        )
    if len(adapters) == 1:  # one adapter: every type reduces to a weighted copy
        combination_type = "linear"
    configs = [lora_model.peft_config[a] for a in adapters]
    # The largest rank any layer of each adapter has (rank_pattern may exceed r).
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination_type in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise ValueError(
                "All adapters must have the same r value when using combination_type linear, ties, dare_ties or "
                "dare_linear."
            )
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type.endswith("svd"):
        new_rank = svd_rank or max(ranks)
    else:
        raise ValueError(f"Invalid combination_type: {combination_type}")

    target_types = {type(c.target_modules) for c in configs}
    if not configs:
        raise ValueError(f"Found no adapter matching the names in {adapters}")
    if len(target_types) > 1:
        raise ValueError(
            "all adapter configs should follow the same target modules type. "
            "Combining adapters with `target_modules` type being a mix of list/set and string is not supported."
        )
    target_type = target_types.pop()
    if target_type is str:
        new_targets = "|".join(f"({c.target_modules})" for c in configs)
    elif target_type is set:
        new_targets = reduce(operator.or_, (c.target_modules for c in configs))
    else:
        raise TypeError(f"Invalid type {target_type} found in target_modules")
    return combination_type, new_rank, new_targets


def add_weighted_adapter(
    lora_model,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: Optional[int] = None,
    svd_clamp: Optional[float] = None,
    svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
) -> None:
    """Adds ``adapter_name`` = the combination of ``adapters`` (see the module docstring); a no-op if it exists."""
    if adapter_name in lora_model.peft_config:
        return
    combination_type, new_rank, new_targets = check_weighted_adapter_args(
        lora_model, adapters, combination_type, svd_rank
    )
    lora_model.peft_config[adapter_name] = replace(
        lora_model.peft_config[adapters[0]],
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=new_targets,
        alpha_pattern={},
        rank_pattern={},
    )
    try:
        lora_model.inject_adapter(lora_model.model, adapter_name)
    except BaseException:
        lora_model.peft_config.pop(adapter_name, None)
        raise
    for name, param in lora_model.model.named_parameters():
        if adapter_name in name:
            param.requires_grad = False

    keys = [key for key, _ in lora_model.model.named_modules() if lora_model.prefix not in key]
    for key in keys:
        _, target, _ = _get_submodules(lora_model.model, key)
        if not isinstance(target, LoraLayer):
            continue
        new_a, new_b = _factors(target, adapter_name)
        if new_a is None:
            continue
        new_a.data = torch.zeros_like(new_a)
        new_b.data = torch.zeros_like(new_b)
        if combination_type == "cat":
            a_parts, b_parts = [], []
            for adapter, weight in zip(adapters, weights):
                lora_a, lora_b = _factors(target, adapter)
                if lora_a is not None:
                    a_parts.append(lora_a.data * weight * target.scaling[adapter])
                    b_parts.append(lora_b.data)
            if not a_parts:
                raise ValueError("No matching LoRAs found. Please raise an issue on GitHub.")
            cat_a, cat_b = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
            new_a.data[: cat_a.shape[0], :] = cat_a
            new_b.data[:, : cat_b.shape[1]] = cat_b
        elif combination_type in SVD_TYPES:
            new_a.data, new_b.data = _svd_factors(
                target, adapters, weights, combination_type, new_rank, new_a, new_b, density,
                majority_sign_method, svd_clamp, svd_full_matrices, svd_driver,
            )  # fmt: skip
        else:
            new_a.data, new_b.data = _combined_factors(
                target, adapters, weights, combination_type, density, majority_sign_method
            )


def _factors(layer: LoraLayer, adapter: str):
    """(A, B) Parameters of ``adapter`` in ``layer`` (embedding layers keep them as raw Parameters)."""
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return None, None


def _combined_factors(layer, adapters, weights, combination_type, density, majority_sign_method):
    """A and B combined separately, the weight √|w s| on each side and its sign on A only (so B A keeps it)."""
    a_list, b_list, a_weights, b_weights = [], [], [], []
    for adapter, weight in zip(adapters, weights):
        lora_a, lora_b = _factors(layer, adapter)
        if lora_a is None:
            continue
        scaled = weight * layer.scaling[adapter]
        magnitude = math.sqrt(abs(scaled))
        a_weights.append(magnitude if scaled >= 0 else -magnitude)
        b_weights.append(magnitude)
        a_list.append(lora_a.data)
        b_list.append(lora_b.data)
    dtype = a_list[0].dtype
    merge_fn = _MERGE_FNS[combination_type]
    results = []
    for tensors, side_weights in ((a_list, a_weights), (b_list, b_weights)):
        side_weights = torch.tensor(side_weights).to(tensors[0].device)
        results.append(merge_fn(tensors, side_weights, density, majority_sign_method).to(dtype))
    return results


def _svd_factors(
    layer, adapters, weights, combination_type, new_rank, new_a, new_b, density, majority_sign_method, clamp,
    full_matrices, driver,
):  # fmt: skip
    """(A, B) = (Vᵀ_k, U_k S_k) of the combined ΔW, reshaped to the layer's A/B shapes for convolutions."""
    valid = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A or a in layer.lora_embedding_A]
    if not valid:
        raise ValueError("No matching LoRAs found. Please raise an issue on GitHub.")
    is_embedding = any(adapter in layer.lora_embedding_A for adapter in adapters)
    deltas = [layer.get_delta_weight(adapter) for adapter, _ in valid]  # each includes its scaling
    valid_weights = torch.tensor([w for _, w in valid]).to(deltas[0].device)
    merge_name = combination_type[: -len("_svd")] if combination_type != "svd" else "linear"
    delta = _MERGE_FNS[merge_name](deltas, valid_weights, density, majority_sign_method)
    is_conv = isinstance(layer, _ConvNd)
    if is_conv:
        delta = delta.flatten(start_dim=1)  # (C_out, C_in·∏k); a pointwise kernel gives (C_out, C_in)
    if getattr(layer, "fan_in_fan_out", False) or is_embedding:
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    vh = vh[:new_rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    if is_conv:
        u, vh = u.reshape(new_b.data.shape), vh.reshape(new_a.data.shape)
    return vh, u
