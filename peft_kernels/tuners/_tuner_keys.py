"""Target-module minimisation and state-dict key helpers of PEFT's ``tuners_utils`` (re-exported there).

``_find_minimal_target_modules``: a long list of full module names (diffusers infers hundreds from a state dict)
condensed to the fewest dotted suffixes that still match every target and no other module. Injection applies it
when an adapter lists at least ``MIN_TARGET_MODULES_FOR_OPTIMIZATION`` targets, so the saved config carries the
short list, as PEFT's does.

The key helpers name which state-dict entries belong to the tuner: everything a tuner layer holds except its
``base_layer``, outside auxiliary wrappers (modules_to_save).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

from torch import nn

from ..layers._base import BaseTunerLayer
from ..utils.constants import DUMMY_MODEL_CONFIG, MIN_TARGET_MODULES_FOR_OPTIMIZATION
from ..utils.other import ModulesToSaveWrapper


def _find_minimal_target_modules(target_modules, other_module_names) -> set[str]:
    """The fewest suffixes (whole dotted components) matching every target and none of ``other_module_names``.

    >>> _find_minimal_target_modules([f"layers.{i}.q" for i in range(3)], ["layers.0.k"])
    {'q'}
    """
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError("target_modules should be a list or set of strings.")
    target_modules = set(target_modules)
    if "" in target_modules:
        raise ValueError("target_modules should not contain an empty string.")
    other_module_names = set(other_module_names)
    if not target_modules.isdisjoint(other_module_names):
        raise ValueError(
            "target_modules and other_module_names contain common elements, this should not happen, please "
            "open a GitHub issue at https://github.com/huggingface/peft/issues with the code to reproduce this issue"
        )

    def suffixes(name: str) -> list[str]:  # shortest first: "c", "b.c", "a.b.c"
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]

    forbidden = {suffix for name in other_module_names for suffix in suffixes(name)}
    required: set[str] = set()
    # Sorted by suffix list for a deterministic result (sets have no order).
    for name, candidates in sorted(((n, suffixes(n)) for n in target_modules), key=lambda item: item[1]):
        for suffix in candidates:
            if suffix in required or suffix in forbidden:
                continue
            if not any(name.endswith(f".{r}") for r in required):
                required.add(suffix)
                break
    return required or target_modules


def minimize_target_modules(peft_config, module_names: list[str]) -> None:
    """Replaces a list/set of ≥ MIN_TARGET_MODULES_FOR_OPTIMIZATION targets by its minimal suffix set, in place."""
    targets = peft_config.target_modules
    if not isinstance(targets, (list, set)) or len(targets) < MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        return
    suffixes = tuple(f".{t}" for t in targets)
    others = [n for n in module_names if n not in targets and not n.endswith(suffixes)]
    minimal = _find_minimal_target_modules(targets, others)
    if len(minimal) < len(targets):
        peft_config.target_modules = minimal


def get_model_config(model: nn.Module) -> dict:
    """``model.config`` as a dict (``to_dict()``, or a dataclass's fields), else ``{"model_type": "custom"}``."""
    config = getattr(model, "config", DUMMY_MODEL_CONFIG)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return config


def _remove_adapter_name_from_state_dict_key(key: str, adapter_name: str) -> str:
    """``m.lora_A.<adapter>.weight`` → ``m.lora_A.weight``; ``m.lora_embedding_A.<adapter>`` → ``m.lora_embedding_A``.

    Only the adapter segment in that position goes, not a module that happens to share the adapter's name.
    """
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):  # a raw Parameter: the adapter name ends the key
        return key.removesuffix(f".{adapter_name}")
    head, _, leaf = key.rpartition(".")
    return f"{re.sub(re.escape(f'.{adapter_name}') + '$', '', head)}.{leaf}"


def _get_tuner_state_dict_key_prefixes(model: nn.Module, adapter_name: Optional[str] = None) -> set[str]:
    """Key prefixes of every tuner-owned entry (restricted to ``adapter_name``'s entries of per-adapter dicts)."""
    from .tuners_utils import BaseTuner

    def owned(module: nn.Module, module_name: str) -> set[str]:
        names = [n for n, _ in module.named_children()]
        names += [n for n, _ in module.named_parameters(recurse=False)]
        names += [n for n, _ in module.named_buffers(recurse=False)]
        found = set()
        for name in names:
            if name in ("base_layer", "model"):  # the wrapped module of a layer / of the tuner
                continue
            prefix = f"{module_name}.{name}" if module_name else name
            child = getattr(module, name)
            if adapter_name is not None and isinstance(child, (nn.ModuleDict, nn.ParameterDict)):
                if adapter_name in child:
                    found.add(f"{prefix}.{adapter_name}")
            else:
                found.add(prefix)
        return found

    prefixes: set[str] = set()
    wrapper_names: set[str] = set()
    for module_name, module in model.named_modules():  # parents come before children
        module_name = module_name.removeprefix("_fsdp_wrapped_module.")
        if isinstance(module, ModulesToSaveWrapper):
            wrapper_names.add(module_name)
        elif isinstance(module, BaseTuner) or (
            isinstance(module, BaseTunerLayer) and not _is_key_under_prefixes(module_name, wrapper_names)
        ):
            prefixes.update(owned(module, module_name))
    return prefixes


def _is_key_under_prefixes(key: str, prefixes: set[str]) -> bool:
    """``key`` equals a prefix or lies under one ("a.b" covers "a.b.c", not "a.bc"); O(depth of key)."""
    while prefixes:
        if key in prefixes:
            return True
        key, dot, _ = key.rpartition(".")
        if not dot:
            return False
    return False


def _filter_state_dict_by_key_prefixes(state_dict: dict[str, Any], prefixes: set[str]) -> dict[str, Any]:
    return {key: value for key, value in state_dict.items() if _is_key_under_prefixes(key, prefixes)}
