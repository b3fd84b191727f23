"""get_peft_model: wraps a model with the adapter of a config (PEFT 0.21.2's ``peft.mapping_func``)."""

from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from .config import PeftConfig
from .layers._base import BaseTunerLayer
from .mapping import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PEFT_TYPE_TO_CONFIG_MAPPING
from .peft_model import PeftModel
from .utils.peft_types import PeftType

__all__ = ["get_peft_model"]


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: Optional[str] = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wraps ``model`` (in place) with the adapter of ``peft_config``; returns the PeftModel of its task type.

    On any error the model's modules and parameters are left exactly as they were.
    """
    if mixed:
        raise NotImplementedError("mixed=True (PeftMixedModel) is not implemented by peft_kernels.")
    if peft_config.peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise NotImplementedError(f"peft_type {peft_config.peft_type!r} is not implemented by peft_kernels.")
    if peft_config.is_prompt_learning and peft_config.task_type not in MODEL_TYPE_TO_PEFT_MODEL_MAPPING:
        # PEFT fails here with KeyError: None; the prompt's placement depends on the task, so name it.
        raise ValueError(
            f"{type(peft_config).__name__} needs a task_type (one of {sorted(MODEL_TYPE_TO_PEFT_MODEL_MAPPING)}), "
            f"got task_type={peft_config.task_type!r}."
        )
    old_name = peft_config.base_model_name_or_path
    new_name = model.__dict__.get("name_or_path", None) or None
    peft_config.base_model_name_or_path = new_name
    if old_name is not None and old_name != new_name:
        warnings.warn(
            f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}'. "
            "Please ensure that the correct base model is loaded when loading this checkpoint."
        )
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        warnings.warn(
            "You are trying to modify a model with PEFT for a second time. If you want to reload the model with a "
            "different config, make sure to call `.unload()` before."
        )
    prefix = "lora_" if peft_config.peft_type == PeftType.LORA else None
    if prefix and adapter_name and prefix in adapter_name:
        warnings.warn(
            f"Adapter name '{adapter_name}' should not be contained in the prefix '{prefix}'. "
            "This may lead to reinitialization of the adapter weights during loading."
        )
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(
                f"peft config has already set base model revision to {peft_config.revision}, overwriting with revision {revision}"
            )
        peft_config.revision = revision
    requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        if peft_config.task_type not in MODEL_TYPE_TO_PEFT_MODEL_MAPPING.keys() and not peft_config.is_prompt_learning:
            return PeftModel(
                model,
                peft_config,
                adapter_name=adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        return MODEL_TYPE_TO_PEFT_MODEL_MAPPING[peft_config.task_type](
            model,
            peft_config,
            adapter_name=adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
    except BaseException:
        # Injection already rolled back module replacements; restore trainability flags and attributes too.
        for name, param in model.named_parameters():
            if name in requires_grad_before:
                param.requires_grad = requires_grad_before[name]
        if "peft_config" in model.__dict__:
            del model.__dict__["peft_config"]
        peft_config.base_model_name_or_path = old_name
        raise
