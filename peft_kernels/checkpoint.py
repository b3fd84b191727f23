"""PeftModel's adapter checkpoints: save_pretrained, from_pretrained, load_adapter and the model card.

``AdapterCheckpointMixin`` is a base class of ``PeftModel`` (peft_model.py): these methods read the model's
state through its public attributes (``peft_config``, ``base_model``, ``add_adapter`` …) and write or read the
files of PEFT's format (adapter_model.safetensors / .bin + adapter_config.json + README.md).
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import nn

from .config import PeftConfig
from .utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .utils.peft_types import PeftType, TaskType
from .utils.save_and_load import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

if TYPE_CHECKING:
    from .peft_model import PeftModel


class AdapterCheckpointMixin:
    """The save/load half of ``PeftModel``."""

    def _get_base_model_class(self, is_prompt_tuning: bool = False):
        return self.base_model.__class__ if is_prompt_tuning else self.base_model.model.__class__

    def save_pretrained(
        self,
        save_directory: str,
        safe_serialization: bool = True,
        selected_adapters: Optional[list[str]] = None,
        save_embedding_layers: Union[str, bool] = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        """Writes, per adapter, adapter_model.safetensors (or .bin) + adapter_config.json (+ README.md)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        if selected_adapters is None:
            selected_adapters = list(self.peft_config.keys())
        elif any(name not in self.peft_config for name in selected_adapters):
            raise ValueError(
                "You passed an invalid `selected_adapters` arguments, current supported adapter names are "
                f"{list(self.peft_config.keys())} - got {selected_adapters}."
            )
        if path_initial_model_for_weight_conversion is not None:
            raise NotImplementedError("path_initial_model_for_weight_conversion (PiSSA/OLoRA) is not supported.")
        if is_main_process:
            os.makedirs(save_directory, exist_ok=True)
            self.create_or_update_model_card(save_directory)
        for adapter_name in selected_adapters:
            peft_config = self.peft_config[adapter_name]
            state_dict = get_peft_model_state_dict(
                self,
                state_dict=kwargs.get("state_dict"),
                adapter_name=adapter_name,
                save_embedding_layers=save_embedding_layers,
            )
            output_dir = os.path.join(save_directory, adapter_name) if adapter_name != "default" else save_directory
            if is_main_process:
                os.makedirs(output_dir, exist_ok=True)
                _save_weights(state_dict, output_dir, safe_serialization)
            if peft_config.base_model_name_or_path is None:
                owner = self.base_model if peft_config.is_prompt_learning else self.base_model.model
                peft_config.base_model_name_or_path = owner.__dict__.get("name_or_path", None) or None
            inference_mode = peft_config.inference_mode
            peft_config.inference_mode = True
            auto_mapping_dict = None
            if peft_config.task_type is None:
                base_cls = self._get_base_model_class(is_prompt_tuning=peft_config.is_prompt_learning)
                auto_mapping_dict = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}
            try:
                if is_main_process:
                    peft_config.save_pretrained(output_dir, auto_mapping_dict=auto_mapping_dict)
            finally:
                peft_config.inference_mode = inference_mode

    def create_or_update_model_card(self, output_dir: str) -> None:
        """README.md as PEFT writes it: an existing card is updated (its other metadata and text kept), else
        huggingface_hub's default template; ``library_name: peft``, the tags, the base model, the pipeline tag of
        a causal LM, and a "Framework versions" line with the PEFT format version we write."""
        from huggingface_hub import ModelCard, ModelCardData

        from .version import PEFT_VERSION_STRING

        path = os.path.join(output_dir, "README.md")
        card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
        card.data["library_name"] = "peft"
        model_config = getattr(self.get_base_model(), "config", None)
        base_model = getattr(model_config, "_name_or_path", None) if model_config is not None else None
        base = self.get_base_model()
        tags = set(getattr(base, "model_tags", None) or [])
        if any(c.__name__ == "PreTrainedModel" for c in type(base).__mro__):
            tags.add("transformers")
        if self.peft_type == PeftType.LORA:
            tags.add("lora")
        if hasattr(base, "name_or_path"):  # PEFT's tag, even when the name is empty (a model built from a config)
            tags.add(f"base_model:adapter:{base.name_or_path}")
        if tags:
            card.data["tags"] = sorted(tags)
        if not card.data.pipeline_tag and self._task_type == TaskType.CAUSAL_LM:
            card.data.pipeline_tag = "text-generation"
        if model_config is not None and hasattr(model_config, "_name_or_path"):
            card.data["base_model"] = base_model
        lines = card.text.splitlines()
        heading, framework_line = "### Framework versions", f"- PEFT {PEFT_VERSION_STRING}"
        if framework_line not in lines:
            if heading in lines:
                lines.insert(lines.index(heading) + 2, framework_line)
            else:
                lines.append(f"{heading}\n\n{framework_line}")
        card.text = "\n".join(lines)
        card.save(path)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: Union[str, os.PathLike],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: Optional[dict] = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Loads an adapter saved by peft_kernels or by Hugging Face PEFT onto ``model``."""
        from .mapping import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PEFT_TYPE_TO_CONFIG_MAPPING

        model_id = str(model_id)
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"))
            if config.peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
                raise NotImplementedError(f"peft_type {config.peft_type!r} is not implemented by peft_kernels.")
        elif not isinstance(config, PeftConfig):
            raise ValueError(f"The input config must be a PeftConfig, got {config.__class__}")
        if hasattr(config, "runtime_config"):
            config.runtime_config.ephemeral_gpu_offload = ephemeral_gpu_offload
        if config.is_prompt_learning and is_trainable:
            raise ValueError("Cannot set a prompt learning adapter to trainable when loading pretrained adapter.")
        config.inference_mode = not is_trainable
        if key_mapping is None and not config.is_prompt_learning:
            # a model class's own old-name -> new-name regexes (transformers' ``_checkpoint_conversion_mapping``)
            key_mapping = getattr(model, "_checkpoint_conversion_mapping", {})
        if config.task_type not in MODEL_TYPE_TO_PEFT_MODEL_MAPPING.keys():
            peft_model = cls(
                model,
                config,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        else:
            peft_model = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[config.task_type](
                model,
                config,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        load_result = peft_model.load_adapter(
            model_id,
            adapter_name,
            is_trainable=is_trainable,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            key_mapping=key_mapping,
            **kwargs,
        )
        missing = [k for k in load_result.missing_keys if "vblora_vector_bank" not in k]
        if missing:
            warnings.warn(f"Found missing adapter keys while loading the checkpoint: {missing}.")
        return peft_model

    def load_adapter(
        self,
        model_id: Union[str, os.PathLike],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: Optional[str] = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: Optional[dict] = None,
        **kwargs: Any,
    ):
        """Loads weights (and, for a new name, the config) of an adapter; does not activate it."""
        from .mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        model_id = str(model_id)
        hub_kwargs = {k: v for k, v in kwargs.items() if k in ("subfolder", "revision", "cache_dir", "token")}
        if torch_device is None:
            from .utils.save_and_load import infer_device

            torch_device = infer_device()
        if adapter_name not in self.peft_config:
            peft_config = PeftConfig.from_pretrained(model_id, subfolder=hub_kwargs.get("subfolder"))
            if peft_config.peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
                raise NotImplementedError(f"peft_type {peft_config.peft_type!r} is not implemented by peft_kernels.")
            if peft_config.is_prompt_learning and is_trainable:
                raise ValueError("Cannot set a prompt learning adapter to trainable when loading pretrained adapter.")
            peft_config.inference_mode = not is_trainable
            self.add_adapter(
                adapter_name,
                peft_config,
                low_cpu_mem_usage=low_cpu_mem_usage,
                autocast_adapter_dtype=autocast_adapter_dtype,
            )
            if is_trainable and not self._is_prompt_learning:  # a new adapter is added frozen; asked to train: train
                self.set_requires_grad(adapter_name)
        adapters_weights = load_peft_weights(model_id, device=torch_device, key_mapping=key_mapping, **hub_kwargs)
        load_result = set_peft_model_state_dict(
            self,
            adapters_weights,
            adapter_name=adapter_name,
            ignore_mismatched_sizes=kwargs.get("ignore_mismatched_sizes", False),
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        tuner_prefix = "lora_" if not self._is_prompt_learning else ""
        adapter_missing = [k for k in load_result.missing_keys if tuner_prefix in k and adapter_name in k]
        if self._is_prompt_learning:
            adapter_missing = []
        load_result.missing_keys.clear()
        load_result.missing_keys.extend(adapter_missing)
        self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if not is_trainable:
            self.eval()
        return load_result


def _save_weights(state_dict: dict, output_dir: str, safe_serialization: bool) -> None:
    if safe_serialization:
        from safetensors.torch import save_file

        # safetensors refuses shared and non-contiguous storage: clone those (PEFT does the same).
        seen = {}
        tensors = {}
        for key, tensor in state_dict.items():
            tensor = tensor.detach()
            ptr = (tensor.untyped_storage().data_ptr(), tensor.device)
            if ptr in seen or not tensor.is_contiguous():
                tensor = tensor.clone().contiguous()
            seen[ptr] = key
            tensors[key] = tensor
        save_file(tensors, os.path.join(output_dir, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        torch.save(state_dict, os.path.join(output_dir, WEIGHTS_NAME))
