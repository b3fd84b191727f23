"""Hot-swapping a loaded LoRA adapter's weights in place (PEFT's ``peft.utils.hotswap``).

``hotswap_adapter(model, path, adapter_name)`` copies a second checkpoint's A/B tensors into the existing
Parameters of ``adapter_name`` (``Tensor.copy_``), so a ``torch.compile``d model keeps its graphs: the tensors
it guards on keep their identity, shape and dtype. Two things would still force a recompilation, and
``prepare_model_for_compiled_hotswap`` (called once, after loading the first adapter, before compiling) removes
both:

- scalings are Python floats that compiled code bakes in → they become 0-d tensors, updated with ``fill_``;
- adapters of different ranks have differently shaped A (r, in) / B (out, r) → every A/B is zero-padded to
  ``target_rank`` (B A is unchanged: the padded rows of A meet zero columns of B), and a smaller adapter swapped
  in later is written into the leading block of the padded tensors, the rest zeroed.

Only LoRA on Linear and Conv layers is swappable; configs must agree on ``use_rslora``, ``lora_dropout``,
``alpha_pattern`` and ``use_dora`` (``check_hotswap_configs_compatible``).
"""

from __future__ import annotations

import math
import warnings
from operator import attrgetter
from typing import Literal, Optional

import torch
from torch import nn

from ..layers._base import BaseTunerLayer
from ..layers.lora import Linear, LoraLayer
from ..layers.lora_conv import _ConvNd
from .peft_types import PeftType
from .save_and_load import adapter_key_map, infer_device, load_peft_weights

CONFIG_KEYS_TO_CHECK = {PeftType.LORA: ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}


def _update_scaling(lora_module: LoraLayer, adapter_name: str, scaling: float) -> None:
    """Sets the adapter's scaling, in place when it is a tensor (so compiled graphs see the new value)."""
    current = lora_module.scaling[adapter_name]
    if current == scaling:
        return
    if isinstance(current, torch.Tensor):
        current.fill_(scaling)
    elif isinstance(current, (float, int)):
        lora_module.scaling[adapter_name] = scaling
    else:
        raise TypeError(
            "Something went wrong when trying to set the new scale value, expected to find the old value to be of type "
            f"float or torch.Tensor, got {type(current)} instead."
        )


def _convert_scalings_to_tensor(model: nn.Module) -> bool:
    """Every LoRA layer's float scalings → 0-d tensors on the base weight's device; False if there is none."""
    found = False
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        found = True
        device = next((p.device for p in module.get_base_layer().parameters()), None)
        for key, value in module.scaling.items():
            if isinstance(value, float):
                module.scaling[key] = torch.tensor(value, device=device)
            elif not isinstance(value, torch.Tensor):
                raise TypeError(
                    "Something went wrong while trying to convert the scalings, expected to find values of type float "
                    f"but found {type(value)} instead."
                )
    return found


def _padded_factor(layer: nn.Module, target_rank: int, is_lora_a: bool, groups: int = 1) -> nn.Module:
    """A copy of ``layer`` (an A or B Linear/Conv) with its rank axis zero-padded to ``target_rank``.

    A's rank is its output axis (dim 0), B's its input axis (dim 1, times B's groups for a grouped conv B). For a
    grouped conv A, each group's block of r/g rows is copied to the start of its padded block of target_rank/g.
    """
    weight = layer.weight
    layer_groups = getattr(layer, "groups", 1)
    rank = weight.shape[0] if is_lora_a else weight.shape[1] * layer_groups
    if rank == target_rank:
        return layer
    if rank > target_rank:
        raise ValueError(
            f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is larger "
            f"({rank}). This is not possible."
        )
    if is_lora_a:
        padded = weight.new_zeros((target_rank, *weight.shape[1:]))
        _copy_rank_blocks(padded, weight.data, groups)
    else:
        if target_rank % layer_groups != 0:
            raise ValueError(
                f"Trying to pad a Conv2d LoRA B with groups={layer_groups} to target rank {target_rank}, but the target "
                f"rank is not divisible by {layer_groups}. Please choose a target rank that is divisible by groups."
            )
        padded = weight.new_zeros((weight.shape[0], target_rank // layer_groups, *weight.shape[2:]))
        padded[:, : weight.shape[1]] = weight.data
    if isinstance(layer, nn.Linear):
        new_layer = nn.Linear(padded.shape[1], padded.shape[0], bias=layer.bias is not None)
    else:
        in_channels = padded.shape[1] * layer_groups
        new_layer = type(layer)(
            in_channels, padded.shape[0], layer.kernel_size, layer.stride, layer.padding, layer.dilation,
            groups=layer_groups, bias=layer.bias is not None,
        )  # fmt: skip
    new_layer = new_layer.to(device=weight.device, dtype=weight.dtype)
    new_layer.weight.data = padded
    new_layer.weight.requires_grad_(weight.requires_grad)
    if layer.bias is not None:
        new_layer.bias.data = layer.bias.data
    return new_layer


def _copy_rank_blocks(destination: torch.Tensor, source: torch.Tensor, groups: int) -> None:
    """source (r, …) into destination (R, …): group g's r/groups rows go to the start of its R/groups block."""
    source_block, destination_block = source.shape[0] // groups, destination.shape[0] // groups
    for g in range(groups):
        start = g * destination_block
        destination[start : start + source_block].copy_(source[g * source_block : (g + 1) * source_block])


def _pad_lora_weights(model: nn.Module, target_rank: int) -> bool:
    """Pads every Linear/Conv LoRA adapter to ``target_rank``; False if the model has none."""
    found = False
    for module in model.modules():
        if isinstance(module, _ConvNd):
            groups = module.get_base_layer().groups
            if target_rank % groups != 0:
                raise ValueError(
                    f"Trying to pad a Conv2d LoRA adapter with groups={groups} to target rank {target_rank}, but the "
                    f"target rank is not divisible by {groups}. Please choose a target rank that is divisible by "
                    f"{groups}."
                )
        elif isinstance(module, Linear):
            groups = 1
        else:
            continue
        for name, layer in module.lora_A.items():
            module.lora_A[name] = _padded_factor(layer, target_rank, is_lora_a=True, groups=groups)
        for name, layer in module.lora_B.items():
            module.lora_B[name] = _padded_factor(layer, target_rank, is_lora_a=False)
        found = True
    return found


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: Optional[int] = None,
    config=None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Makes later ``hotswap_adapter`` calls recompilation-free (see the module docstring). In place.

    ``target_rank``: the largest rank among the adapters to be swapped in (None: ranks stay). ``config``: a
    LoraConfig or a dict of them whose ``r`` (and rank_pattern values) are set to ``target_rank``.
    ``check_compiled``: "error" (default), "warn" or "ignore" when ``model`` is already compiled.
    """
    is_compiled = hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", False)
    if is_compiled:
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn(
                "prepare_model_for_compiled_hotswap was called with a model that is already compiled. This will likely "
                "result in re-compilation, hurting performance. Call the function before compiling the model."
            )
        elif check_compiled != "ignore":
            raise ValueError(
                f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead."
            )
    converted = _convert_scalings_to_tensor(model)
    padded = _pad_lora_weights(model, target_rank=target_rank) if target_rank is not None else False
    if not (converted or padded):
        raise ValueError(
            "No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` after loading "
            "the first adapter and before loading the second adapter."
        )
    if not config or target_rank is None:
        return
    for lora_config in (config if isinstance(config, dict) else {"config": config}).values():
        lora_config.r = target_rank
        for key in lora_config.rank_pattern or {}:
            lora_config.rank_pattern[key] = target_rank


def _owning_module_name(key: str) -> str:
    """``…<module>.lora_A.<adapter>.weight`` / ``…<module>.lora_embedding_A.<adapter>`` → ``…<module>``."""
    return key[: key.rindex(".lora_")]


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config,
    parameter_prefix: str = "lora_",
) -> None:
    """Copies ``state_dict`` (model keys, adapter name included) into adapter ``adapter_name``'s tensors.

    Its tensors the state dict lacks are zeroed; a key the model lacks is a RuntimeError (nothing written then).
    """
    if any(adapter_name in m.merged_adapters for m in model.modules() if isinstance(m, BaseTunerLayer)):
        raise ValueError(
            f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base weights. "
            "Please unmerge the adapter first by calling `peft_model.unmerge_adapter()`; unmerging after a swap of "
            "merged weights would otherwise corrupt them."
        )
    compiled_prefix = "_orig_mod." if hasattr(model, "_orig_mod") else ""
    unexpected = []
    for key in state_dict:
        try:
            attrgetter(key)(model)
        except AttributeError:
            unexpected.append(key)
    if unexpected:
        raise RuntimeError(
            f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}."
        )
    missing = {
        k.removeprefix(compiled_prefix)
        for k in model.state_dict()
        if parameter_prefix in k and adapter_name in k and k.removeprefix(compiled_prefix) not in state_dict
    }
    for key in missing:  # the new adapter does not have these: their contribution must vanish
        attrgetter(key)(model).data.fill_(0.0)

    for key, new_value in state_dict.items():
        module = model.get_submodule(_owning_module_name(key))
        rank = config.rank_pattern.get(_pattern_key(config.rank_pattern, key), config.r)
        alpha = config.alpha_pattern.get(_pattern_key(config.alpha_pattern, key), config.lora_alpha)
        _update_scaling(module, adapter_name, alpha / math.sqrt(rank) if config.use_rslora else alpha / rank)
        old = attrgetter(key)(model)
        _swap_tensor(old, new_value.to(old.device), key, module)


def _pattern_key(patterns: dict, key: str) -> str:
    from ..tuners.tuners_utils import get_pattern_key

    return get_pattern_key(patterns.keys(), key)


def _swap_tensor(old: torch.Tensor, new: torch.Tensor, key: str, module: nn.Module) -> None:
    """old ← new in place; a smaller new fills the leading rank block of a padded old (rest zeroed)."""
    if old.shape == new.shape:
        old.data.copy_(new)
        return
    if all(o >= n for o, n in zip(old.shape, new.shape)):
        if old.dim() not in (2, 3, 4, 5):
            raise NotImplementedError(
                f"Trying to hotswap an adapter whose weight has {old.dim()} dimensions, but only Conv and Linear "
                "are supported"
            )
        old.data.fill_(0)
        if old.shape[0] > new.shape[0]:
            groups = module.get_base_layer().groups if isinstance(module, _ConvNd) and ".lora_A." in key else 1
            _copy_rank_blocks(old.data, new, groups)
        elif old.shape[1] > new.shape[1]:
            old.data[:, : new.shape[1]].copy_(new)
        else:
            raise ValueError(
                f"Incompatible shapes found for LoRA weights {key}: {old.shape} vs {new.shape}. Please ensure that "
                "all ranks are padded to the largest rank among all LoRA adapters by using "
                "peft_kernels.utils.hotswap.prepare_model_for_compiled_hotswap."
            )
        return
    # A larger new tensor: swap it in (a compiled model recompiles; prepare_model_for_compiled_hotswap avoids it).
    try:
        torch.utils.swap_tensors(old, new)
    except RuntimeError:
        old.data = new.data


def check_hotswap_configs_compatible(config0, config1) -> None:
    """ValueError unless both configs are LoRA and agree on the keys of ``CONFIG_KEYS_TO_CHECK``."""
    if config0.peft_type != config1.peft_type:
        raise ValueError(f"Incompatible PEFT types found: {config0.peft_type.value} and {config1.peft_type.value}")
    if config0.peft_type not in CONFIG_KEYS_TO_CHECK:
        raise ValueError(
            f"Hotswapping only supports {', '.join(CONFIG_KEYS_TO_CHECK.keys())} but "
            f"{config0.peft_type.value} was passed."
        )
    dict0, dict1 = config0.to_dict(), config1.to_dict()
    sentinel = object()
    for key in CONFIG_KEYS_TO_CHECK[config0.peft_type]:
        value0, value1 = dict0.get(key, sentinel), dict1.get(key, sentinel)
        if value0 != value1:
            raise ValueError(f"Configs are incompatible: for {key}, {value0} != {value1}")


def _checkpoint_to_model_keys(model: nn.Module, checkpoint: dict, adapter_name: str) -> dict[str, torch.Tensor]:
    """Checkpoint keys (no adapter name) → the model's keys of ``adapter_name`` (a compiled model: its inner one)."""
    inner = getattr(model, "_orig_mod", model)
    config = inner.peft_config[adapter_name]
    ckpt_to_model = {ckpt: mk for mk, ckpt in adapter_key_map(inner, adapter_name, config).items()}
    converted = {}
    for key, value in checkpoint.items():
        if key in ckpt_to_model:
            converted[ckpt_to_model[key]] = value
        else:  # not in the model: named as it would be, so the error names the offending module
            head, _, leaf = key.rpartition(".")
            converted[f"{head}.{adapter_name}.{leaf}" if ".lora_" in key else key] = value
    return converted


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str,
    adapter_name: str,
    torch_device: Optional[str] = None,
    **kwargs,
) -> None:
    """Replaces adapter ``adapter_name``'s weights (and scalings) with the checkpoint at ``model_name_or_path``.

    The name stays; targets must be the same modules and the configs compatible (see the module docstring).
    """
    from ..config import PeftConfig

    if torch_device is None:
        torch_device = infer_device()
    hub_kwargs = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if k in kwargs}
    config = PeftConfig.from_pretrained(model_name_or_path, **hub_kwargs)
    inner = getattr(model, "_orig_mod", model)
    check_hotswap_configs_compatible(inner.active_peft_config, config)
    checkpoint = load_peft_weights(model_name_or_path, device=torch_device, **hub_kwargs)
    state_dict = _checkpoint_to_model_keys(model, checkpoint, adapter_name)
    hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config, parameter_prefix="lora_")


__all__ = [
    "check_hotswap_configs_compatible",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "prepare_model_for_compiled_hotswap",
]
