"""Adapter state dicts in PEFT's checkpoint format, and loading them back under any adapter name.

The model-side key of every adapter tensor and its checkpoint key are derived from the same walk over the
model's tuner layers (``adapter_key_map``), so saving and loading are exact inverses:

    base_model.model.<path>.lora_A.<adapter>.weight      <->  base_model.model.<path>.lora_A.weight
    base_model.model.<path>.lora_embedding_A.<adapter>   <->  base_model.model.<path>.lora_embedding_A
    base_model.model.<path>.modules_to_save.<adapter>.w  <->  base_model.model.<path>.w
    prompt learning: the encoder output                  <->  prompt_embeddings
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .constants import EMBEDDING_LAYER_NAMES, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .legacy_keys import rename_legacy_lora_keys
from .other import ModulesToSaveWrapper

MODEL_PREFIX = "base_model.model."
# Wrappers whose state_dict hooks drop their own segment from keys (FSDP1 units, activation checkpointing):
# module names under them must drop it too, or the keys would miss the state dicts Trainer/accelerate gather.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _lora_layer_types():
    from ..layers.lora import LoraLayer

    return (LoraLayer,)


class AdapterShapeMismatchError(ValueError, RuntimeError):
    """A checkpoint tensor's shape differs from the model's. A RuntimeError as PEFT raises (torch's
    load_state_dict), and a ValueError as earlier peft_kernels releases did."""


def adapter_key_map(model: nn.Module, adapter_name: str, config) -> dict[str, str]:
    """model state_dict key -> checkpoint key, for every tensor that belongs to ``adapter_name``."""
    mapping: dict[str, str] = {}
    lora_types = _lora_layer_types()
    model_keys = None
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for segment in _WRAPPER_SEGMENTS:
            prefix = prefix.replace(segment, "")
        if isinstance(module, lora_types):
            for layer_name in module.adapter_layer_names:
                container = getattr(module, layer_name)
                if adapter_name not in container:
                    continue
                item = container[adapter_name]
                if isinstance(item, nn.Parameter):
                    mapping[f"{prefix}{layer_name}.{adapter_name}"] = f"{prefix}{layer_name}"
                else:
                    for key in item.state_dict():
                        mapping[f"{prefix}{layer_name}.{adapter_name}.{key}"] = f"{prefix}{layer_name}.{key}"
            if getattr(config, "bias", "none") == "lora_only":
                base = module.get_base_layer()
                if getattr(base, "bias", None) is not None:
                    bias_key = f"{prefix}base_layer.bias"
                    mapping[bias_key] = bias_key
        elif isinstance(module, ModulesToSaveWrapper):
            for ckpt_suffix, model_suffix in module.adapter_state_dict_load_map(adapter_name).items():
                mapping[f"{prefix}{model_suffix}"] = f"{prefix}{ckpt_suffix}"
    if getattr(config, "bias", "none") == "all":
        model_keys = model_keys or model.state_dict().keys()
        other_markers = [f".{a}." for a in model.peft_config if a != adapter_name]
        for key in model_keys:
            if (key == "bias" or key.endswith(".bias")) and key not in mapping:
                if ".modules_to_save." in key or any(m in key for m in other_markers):
                    continue
                if any(f".{ln}." in key for ln in ("lora_A", "lora_B")):
                    continue
                mapping[key] = key
    return mapping


def duplicate_checkpoint_keys(model: nn.Module, adapter_name: str, config) -> dict[str, str]:
    """checkpoint key -> model key for tensors PEFT saves under a second key as well.

    With ``bias="all"``, PEFT's bias selection also picks the trained copy's bias inside a ``modules_to_save``
    wrapper, so its checkpoint holds both ``<head>.bias`` (from the wrapper) and ``<head>.modules_to_save.bias``
    (from the bias rule). Reproduced so that both libraries write the same key set.
    """
    if getattr(config, "bias", "none") != "all":
        return {}
    marker = f".modules_to_save.{adapter_name}."
    return {
        key.replace(marker, ".modules_to_save."): key
        for key in model.state_dict()
        if marker in key and (key.endswith(".bias"))
    }


def _embedding_key_prefixes(model: nn.Module, config, save_embedding_layers) -> list[str]:
    target_modules = getattr(config, "target_modules", None)
    embedding_targeted = (
        bool(target_modules)
        and not isinstance(target_modules, str)
        and any(k in target_modules for k in EMBEDDING_LAYER_NAMES)
    )
    if save_embedding_layers == "auto":
        if embedding_targeted:
            warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.")
            save_embedding_layers = True
        else:
            save_embedding_layers = False
    if not save_embedding_layers or not hasattr(model, "get_input_embeddings"):
        return []
    prefixes = []
    layers = [model.get_input_embeddings()]
    if hasattr(model, "get_output_embeddings"):
        layers.append(model.get_output_embeddings())
    for layer in layers:
        if layer is None:
            continue
        if embedding_targeted and not isinstance(getattr(layer, "base_layer", None), (nn.Linear, nn.Embedding)):
            continue  # targeted: only the adapted (wrapped) embedding layers are saved, as PEFT; an untouched head not
        for name, module in model.named_modules():
            if module is layer or getattr(module, "base_layer", None) is layer:
                prefixes.append(f"{name}.")
                break
    return prefixes


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Optional[dict] = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers="auto",
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one adapter, keys without the adapter name (see the module docstring)."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    config = model.peft_config[adapter_name]
    if config.is_prompt_learning:
        if config.inference_mode:
            embeddings = model.prompt_encoder[adapter_name].embedding.weight
        else:
            embeddings = model.get_prompt_embedding_to_save(adapter_name)
        # modules_to_save (e.g. the SEQ_CLS head) are saved next to the prompt, keys "base_model.<path>.weight".
        mapping = adapter_key_map(model, adapter_name, config)
        if mapping and state_dict is None:
            state_dict = model.state_dict()
        to_return = {"prompt_embeddings": embeddings}
        to_return.update({ckpt: state_dict[mk] for mk, ckpt in mapping.items() if mk in state_dict})
        return to_return
    if state_dict is None:
        state_dict = model.state_dict()
    mapping = adapter_key_map(model, adapter_name, config)
    to_return = {ckpt_key: state_dict[model_key] for model_key, ckpt_key in mapping.items() if model_key in state_dict}
    for ckpt_key, model_key in duplicate_checkpoint_keys(model, adapter_name, config).items():
        if model_key in state_dict:
            to_return[ckpt_key] = state_dict[model_key]
    for prefix in _embedding_key_prefixes(model, config, save_embedding_layers):
        for key, value in state_dict.items():
            if key.startswith(prefix) and key not in mapping:
                other = [a for a in model.peft_config if a != adapter_name]
                if any(f".{a}." in key or key.endswith(f".{a}") for a in other):
                    continue
                to_return[key] = value
    return to_return


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict,
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
):
    """Loads checkpoint tensors into adapter ``adapter_name``; returns ``_IncompatibleKeys``.

    Every key and shape is checked before anything is written: a mismatch raises a ValueError naming the key
    and both shapes (unless ``ignore_mismatched_sizes``), and the model is left untouched.
    """
    config = model.peft_config[adapter_name]
    if config.is_prompt_learning:
        if "prompt_embeddings" not in peft_model_state_dict:
            raise ValueError(
                f"The checkpoint has no 'prompt_embeddings' tensor (keys: {sorted(peft_model_state_dict)[:5]})."
            )
        encoder = model.prompt_encoder[adapter_name]
        value = peft_model_state_dict["prompt_embeddings"]
        expected = tuple(encoder.embedding.weight.shape)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"Shape mismatch for 'prompt_embeddings': the checkpoint has {tuple(value.shape)}, the model "
                f"expects {expected}."
            )
        ckpt_to_model = {ckpt: mk for mk, ckpt in adapter_key_map(model, adapter_name, config).items()}
        to_load = {ckpt_to_model[k]: v for k, v in peft_model_state_dict.items() if k in ckpt_to_model}
        unexpected = [k for k in peft_model_state_dict if k != "prompt_embeddings" and k not in ckpt_to_model]
        encoder.embedding.load_state_dict({"weight": value}, strict=True)
        if to_load:
            model.load_state_dict(to_load, strict=False)
        return _IncompatibleKeys(missing_keys=[], unexpected_keys=unexpected)

    mapping = adapter_key_map(model, adapter_name, config)
    ckpt_to_model = {ckpt: mk for mk, ckpt in mapping.items()}
    ckpt_to_model.update(duplicate_checkpoint_keys(model, adapter_name, config))
    model_sd = model.state_dict()
    has_prefix = any(k.startswith(MODEL_PREFIX) for k in model_sd)
    known = set(ckpt_to_model) if has_prefix else set(ckpt_to_model) | {MODEL_PREFIX + k for k in ckpt_to_model}
    peft_model_state_dict = rename_legacy_lora_keys(model, peft_model_state_dict, known)
    to_load, unexpected, mismatched = {}, [], []
    for key, value in peft_model_state_dict.items():
        lookup = key if has_prefix else key.removeprefix(MODEL_PREFIX)
        model_key = ckpt_to_model.get(lookup)
        if model_key is None and lookup in model_sd and _is_embedding_key(lookup):
            model_key = lookup  # full embedding weights saved with save_embedding_layers
        if model_key is None and lookup in model_sd and lookup.endswith("bias"):
            model_key = lookup  # a base bias trained with bias="all"/"lora_only": loaded whatever this config says
        if model_key is None:
            unexpected.append(key)
            continue
        expected = model_sd[model_key].shape
        if value.shape != expected:
            if ignore_mismatched_sizes:
                mismatched.append((model_key, value.shape, expected))  # PEFT's warning: model keys, torch.Size
                continue
            raise AdapterShapeMismatchError(
                f"Shape mismatch for {key!r} (adapter {adapter_name!r}): the checkpoint has {tuple(value.shape)}, "
                f"the model expects {tuple(expected)}. Was the adapter trained with another r, target module or "
                "base model?"
            )
        to_load[model_key] = value
    result = model.load_state_dict(to_load, strict=False, assign=low_cpu_mem_usage)
    if low_cpu_mem_usage:
        for module in model.modules():
            if hasattr(module, "_move_adapter_to_device_of_base_layer"):
                module._move_adapter_to_device_of_base_layer(adapter_name)
    if mismatched:
        lines = "\n".join(
            f"- {k}: found shape {a} in the checkpoint and {b} in the model instantiated" for k, a, b in mismatched
        )
        warnings.warn(
            f"Some weights of {model.__class__.__name__} were not initialized from the model checkpoint and are "
            f"being ignored because you passed `ignore_mismatched_sizes=True`: {lines}."
        )
    return _IncompatibleKeys(missing_keys=list(result.missing_keys), unexpected_keys=unexpected)


def _is_embedding_key(key: str) -> bool:
    return any(f"{name}." in key for name in EMBEDDING_LAYER_NAMES)


def infer_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


def load_peft_weights(model_id: str, device: Optional[str] = None, key_mapping=None, **hf_hub_download_kwargs) -> dict:
    """Adapter tensors from a folder (safetensors first, then .bin) or the Hub cache."""
    subfolder = hf_hub_download_kwargs.pop("subfolder", None)
    path = os.path.join(model_id, subfolder) if subfolder else model_id
    if device is None:
        device = infer_device()
    safetensors_file = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
    bin_file = os.path.join(path, WEIGHTS_NAME)
    filename = None
    use_safetensors = True
    if os.path.exists(safetensors_file):
        filename = safetensors_file
    elif os.path.exists(bin_file):
        filename, use_safetensors = bin_file, False
    else:
        from ..config import _hub_file

        hub_kwargs = {k: v for k, v in hf_hub_download_kwargs.items() if k in ("revision", "cache_dir", "token")}
        filename = _hub_file(model_id, SAFETENSORS_WEIGHTS_NAME, subfolder, hub_kwargs)
        if filename is None:
            filename = _hub_file(model_id, WEIGHTS_NAME, subfolder, hub_kwargs)
            use_safetensors = False
        if filename is None:
            raise ValueError(
                f"Can't find weights for {model_id} in {model_id} or in the Hugging Face Hub. Please check that the "
                f"file {WEIGHTS_NAME} or {SAFETENSORS_WEIGHTS_NAME} is present at {model_id}."
            )
    if use_safetensors:
        from safetensors.torch import load_file

        adapters_weights = load_file(filename, device=str(device))
    else:
        adapters_weights = torch.load(filename, map_location=torch.device(device), weights_only=True)
    if key_mapping:
        adapters_weights = {_map_key(key, key_mapping): value for key, value in adapters_weights.items()}
    return adapters_weights


def _map_key(key: str, key_mapping: dict) -> str:
    """``key`` with the first ``key_mapping`` regex that matches its module path applied (PEFT's rule): the
    ``base_model.model.`` / ``base_model.`` prefix is set aside, so patterns are written against model names."""
    prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), None)
    if prefix is None:
        raise ValueError(f"Cannot apply key_mapping to the checkpoint key {key!r}: it has no 'base_model.' prefix.")
    path = key.removeprefix(prefix)
    for pattern, replacement in key_mapping.items():
        mapped, count = re.subn(pattern, replacement, path)
        if count:
            return prefix + mapped
    return key
