"""The base model's weights of a PeftModel under the base model's own keys, and loading them back.

Injection renames base weights: ``q.weight`` becomes ``q.base_layer.weight`` inside a LoRA layer and
``head.weight`` becomes ``head.original_module.weight`` inside a modules_to_save wrapper. ``get_base_model_state_dict``
drops every adapter tensor and strips those infixes; ``set_base_model_state_dict`` maps original keys back (e.g. to
load base weights after FSDP wrapping). The infix is stripped only where the module walk says it is one, so a base
module that happens to be called ``base_layer`` keeps its name.
"""

from __future__ import annotations

from collections import namedtuple

import torch
from torch import nn

from ..layers._base import BaseTunerLayer
from .other import ModulesToSaveWrapper

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def _adapter_prefixes(root: nn.Module) -> set[str]:
    """Key prefixes owned by adapters: a tuner layer's everything but base_layer, a wrapper's copies."""
    prefixes = set()
    for module_name, module in root.named_modules():
        dot = f"{module_name}." if module_name else ""
        if isinstance(module, ModulesToSaveWrapper):
            prefixes.add(f"{dot}modules_to_save")
        elif isinstance(module, BaseTunerLayer):
            names = [n for n, _ in module.named_children()]
            names += [n for n, _ in module.named_parameters(recurse=False)]
            names += [n for n, _ in module.named_buffers(recurse=False)]
            prefixes.update(f"{dot}{n}" for n in names if n != "base_layer")
    return prefixes


def _is_adapter_key(key: str, prefixes: set[str]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def _original_key(root: nn.Module, key: str) -> str:
    """``key`` with the ``base_layer`` / ``original_module`` infixes that injection added removed."""
    kept, current = [], root
    for part in key.split("."):
        child = getattr(current, part, None) if current is not None else None
        if not isinstance(child, nn.Module):
            kept.append(part)
            current = None
        elif (part == "base_layer" and isinstance(current, BaseTunerLayer)) or (
            part == "original_module" and isinstance(current, ModulesToSaveWrapper)
        ):
            current = child
        else:
            kept.append(part)
            current = child
    return ".".join(kept)


def _key_map(model) -> dict[str, str]:
    """original key -> key in ``model.base_model.model.state_dict()`` for every base tensor."""
    root = model.base_model.model
    prefixes = _adapter_prefixes(root)
    return {_original_key(root, k): k for k in root.state_dict() if not _is_adapter_key(k, prefixes)}


def get_base_model_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict with its original keys (no adapter tensors) from a PeftModel."""
    if model._is_prompt_learning:
        return dict(model.base_model.state_dict())
    current = model.base_model.model.state_dict()
    return {original: current[key] for original, key in _key_map(model).items()}


def set_base_model_state_dict(model, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Loads ``state_dict`` (original keys) into the PeftModel's base weights; ``(missing_keys, unexpected_keys)``.

    ``strict``: a missing or unexpected key is a RuntimeError listing them, and nothing is loaded.
    """
    if model._is_prompt_learning:
        return model.base_model.load_state_dict(state_dict, strict=strict)
    key_map = _key_map(model)
    unexpected = [k for k in state_dict if k not in key_map]
    missing = [k for k in key_map if k not in state_dict]
    if strict and (missing or unexpected):
        messages = []
        if missing:
            messages.append(f"Missing key(s) in state_dict: {missing}")
        if unexpected:
            messages.append(f"Unexpected key(s) in state_dict: {unexpected}")
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(messages))
    model.base_model.model.load_state_dict(
        {key_map[k]: v for k, v in state_dict.items() if k in key_map}, strict=False
    )
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)
