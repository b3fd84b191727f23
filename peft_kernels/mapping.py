"""The type → class tables (leaf registry), get_peft_config and inject_adapter_in_model.

The modules that define the classes fill the tables when they are imported (``register_tuner`` in each
``tuners/<method>/__init__.py``, the task classes at the end of ``task_models.py``), so this module imports none
of them: everything above may import it. ``get_peft_model`` needs ``PeftModel`` and lives in ``mapping_func.py``,
as in PEFT 0.21.2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torch import nn

if TYPE_CHECKING:
    from .config import PeftConfig

# PeftType → config class, for every method (filled by tuners/<method>/__init__.py).
PEFT_TYPE_TO_CONFIG_MAPPING: dict = {}
# PeftType → tuner model (BaseTuner) class, for the methods that inject layers: LoRA.
PEFT_TYPE_TO_TUNER_MAPPING: dict = {}
# PeftType → the prefix of its parameter names ("lora_", "prefix_tuning_", …), as PEFT 0.21.2's (register_tuner).
PEFT_TYPE_TO_PREFIX_MAPPING: dict = {}
# TaskType → PeftModel task class (filled by task_models.py).
MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict = {}

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "get_peft_config",
    "inject_adapter_in_model",
    "register_tuner",
]


def register_tuner(peft_type, config_cls, model_cls=None) -> None:
    """Registers a method's config class, its parameter-name prefix (PEFT's: the type's lowercase name + "_") and,
    for methods that inject layers, its tuner model class."""
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = peft_type.value.lower() + "_"
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    if model_cls is not None:
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls


def get_peft_config(config_dict: dict) -> PeftConfig:
    """PEFT_TYPE_TO_CONFIG_MAPPING[config_dict["peft_type"]](**config_dict)."""
    peft_type = config_dict["peft_type"]
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise NotImplementedError(
            f"peft_type {peft_type!r} is not implemented by peft_kernels; supported: "
            f"{', '.join(sorted(p.value for p in PEFT_TYPE_TO_CONFIG_MAPPING))}."
        )
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**config_dict)


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: Optional[dict] = None,
) -> nn.Module:
    """Injects LoRA layers into ``model`` in place and returns it (not a PeftModel)."""
    if peft_config.is_prompt_learning or peft_config.is_adaption_prompt:
        raise ValueError("`create_and_replace` does not support prompt learning and adaption prompt yet.")
    if peft_config.peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        raise ValueError(
            f"`inject_adapter_in_model` does not support {peft_config.peft_type} yet. Please use `get_peft_model`."
        )
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[peft_config.peft_type]
    peft_model = tuner_cls(model, peft_config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    return peft_model.model
