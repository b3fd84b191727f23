"""PeftModel and its task classes: adapters, forward, save/load and parameter counting (PEFT 0.21.2 API).

LoRA models wrap the base model in ``LoraModel`` (``self.base_model.model`` is the HF model, keys start with
``base_model.model.``). Prompt-learning models keep the HF model as ``self.base_model`` and add
``prompt_encoder``; their forward/generate live in ``tuners/prompt_learning.py``.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

from .config import PeftConfig
from .layers._base import BaseTunerLayer
from .tuners import prompt_learning
from .tuners.lora import LoraModel
from .tuners.tuners_utils import set_trainable_modules
from .utils.constants import QA_HEAD_NAMES, SAFETENSORS_WEIGHTS_NAME, SEQ_CLS_HEAD_NAMES, WEIGHTS_NAME
from .utils.other import ModulesToSaveWrapper
from .utils.peft_types import PeftType
from .utils.save_and_load import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

PEFT_TYPE_TO_TUNER_MAPPING = {PeftType.LORA: LoraModel}


class PeftModel(nn.Module):
    """Base model + adapters. ``forward`` runs the base model with the active adapter applied."""

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self.active_adapter = adapter_name
        self.peft_type = peft_config.peft_type
        self.special_peft_forward_args = {"adapter_names", "alora_offsets"}
        self._is_prompt_learning = peft_config.is_prompt_learning
        if self._is_prompt_learning:
            self._peft_config = {adapter_name: peft_config}
            self.base_model = model
            self.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        else:
            self._peft_config = None
            tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_config.peft_type)
            if tuner_cls is None:
                raise NotImplementedError(
                    f"peft_type {peft_config.peft_type!r} is not implemented by peft_kernels (LoRA, prefix tuning, "
                    "P-tuning and prompt tuning are)."
                )
            self.base_model = tuner_cls(model, {adapter_name: peft_config}, adapter_name, low_cpu_mem_usage)
        self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        self.base_model_torch_dtype = getattr(model, "dtype", None)
        # transformers' Trainer recognises PEFT models by class: register ours (adapter-only checkpoints).
        from .integration.trainer import ensure_trainer_support

        ensure_trainer_support()

    # ------------------------------------------------------------------ properties
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        if self._is_prompt_learning:
            return self._peft_config
        return self.base_model.peft_config

    @peft_config.setter
    def peft_config(self, value: dict[str, PeftConfig]) -> None:
        if self._is_prompt_learning:
            self._peft_config = value
        else:
            self.base_model.peft_config = value

    @property
    def active_adapters(self) -> list[str]:
        try:
            adapters = self.base_model.active_adapters
            if not isinstance(adapters, list):
                # Prompt learning: base_model is the transformers model, whose active_adapters is a method.
                adapters = [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)
        except AttributeError:
            adapters = [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)
        return adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        names = set()
        for config in self.peft_config.values():
            if getattr(config, "modules_to_save", None):
                names.update(config.modules_to_save)
        return names or None

    @property
    def has_active_enabled_adapter(self) -> bool:
        """False only when adapters were disabled via ``disable_adapter`` (PEFT's rule, kept as is)."""
        if self.peft_config[self.active_adapter].is_prompt_learning:
            return not self._adapters_disabled
        return not self._adapters_disabled or not self.active_adapters

    def push_to_hub(self, repo_id: str, **kwargs):
        """Uploads the adapter files ``save_pretrained`` writes (never the base model); see ``utils/hub.py``."""
        from .utils.hub import push_adapter_to_hub

        return push_adapter_to_hub(self, repo_id, **kwargs)

    @property
    def _adapters_disabled(self) -> bool:
        return getattr(self, "_adapters_disabled_flag", False)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model if self._is_prompt_learning else self.base_model.model

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Adds (does not activate) an adapter of the same PEFT type; on failure nothing is left behind."""
        if peft_config.peft_type != self.peft_type:
            raise ValueError(
                f"Cannot combine adapters with different peft types. Found {self.peft_type} and "
                f"{peft_config.peft_type}."
            )
        if self._is_prompt_learning:
            if (
                adapter_name in self._peft_config
                and hasattr(self, "prompt_encoder")
                and adapter_name in self.prompt_encoder
            ):
                raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
            self._peft_config[adapter_name] = peft_config
            try:
                prompt_learning.add_adapter(self, adapter_name, peft_config, low_cpu_mem_usage)
            except BaseException:
                self._peft_config.pop(adapter_name, None)
                raise
        else:
            if adapter_name in self.peft_config:
                raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
            self.peft_config[adapter_name] = peft_config
            try:
                self.base_model.inject_adapter(
                    self.base_model.model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
                )
            except BaseException:
                self.peft_config.pop(adapter_name, None)
                raise
        self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found.")
        self.active_adapter = adapter_name
        if self._is_prompt_learning:
            prompt_learning.set_adapter(self, adapter_name, inference_mode)
        else:
            self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)
            self.base_model._mark_only_adapters_as_trainable(self.base_model.model)
            if inference_mode:
                for module in self.base_model.model.modules():
                    if isinstance(module, BaseTunerLayer):
                        module.set_adapter(adapter_name, inference_mode=True)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if self._is_prompt_learning:
            prompt_learning.delete_adapter(self, adapter_name)
        else:
            self.base_model.delete_adapter(adapter_name)
            new_active = self.base_model.active_adapters
            self.active_adapter = new_active[0] if len(new_active) == 1 else new_active

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        if self._is_prompt_learning:
            raise TypeError(
                f"Setting `requires_grad` is not supported for prompt learning methods like {self.peft_type}."
            )
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        for module in self.base_model.model.modules():
            if isinstance(module, BaseTunerLayer):
                for layer_name in module.adapter_layer_names:
                    container = getattr(module, layer_name)
                    for key in names:
                        if key in container:
                            container[key].requires_grad_(requires_grad)
            elif isinstance(module, ModulesToSaveWrapper):
                for key in names:
                    if key in module.modules_to_save:
                        module.modules_to_save[key].requires_grad_(requires_grad)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """fp16/bf16 adapter weights become fp32 (PEFT's default): the LoRA branch then trains in fp32."""
        if not autocast_adapter_dtype:
            return
        half = (torch.float16, torch.bfloat16)
        for module in self.modules():
            if isinstance(module, BaseTunerLayer):
                for layer_name in module.adapter_layer_names:
                    container = getattr(module, layer_name, None)
                    if container is None or adapter_name not in container:
                        continue
                    item = container[adapter_name]
                    params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                    for param in params:
                        if param.dtype in half:
                            param.data = param.data.to(torch.float32)
        if self._is_prompt_learning and adapter_name in getattr(self, "prompt_encoder", {}):
            for param in self.prompt_encoder[adapter_name].parameters():
                if param.dtype in half:
                    param.data = param.data.to(torch.float32)

    # ------------------------------------------------------------------ counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) over named_parameters (shared tensors once); ZeRO-3 ``ds_numel``; 4-bit doubled."""
        trainable, total = 0, 0
        for _, param in self.named_parameters():
            num = param.numel()
            if num == 0 and hasattr(param, "ds_numel"):
                num = param.ds_numel
            if param.__class__.__name__ == "Params4bit":
                num_bytes = param.quant_storage.itemsize if hasattr(param, "quant_storage") else 1
                num = num * 2 * num_bytes
            total += num
            if param.requires_grad:
                trainable += num
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------ prompt learning
    def get_prompt(
        self, batch_size: int, task_ids: Optional[torch.Tensor] = None, max_cache_len: Optional[int] = None
    ):
        """Prompt of the active adapter: a K/V Cache (prefix tuning, P cached tokens) or [B, N, D] embeddings."""
        return prompt_learning.get_prompt(self, batch_size, task_ids=task_ids, max_cache_len=max_cache_len)

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """The ``prompt_embeddings`` tensor a checkpoint stores for ``adapter_name`` (encoder output, CPU)."""
        return prompt_learning.get_prompt_embedding_to_save(self, adapter_name)

    # ------------------------------------------------------------------ forward
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        if self._is_prompt_learning:
            yield
            return
        with self.base_model._enable_peft_forward_hooks(*args, **kwargs):
            yield

    def forward(self, *args: Any, **kwargs: Any):
        if self._is_prompt_learning:
            return prompt_learning.forward(self, *args, **kwargs)
        with self._enable_peft_forward_hooks(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model()(*args, **kwargs)

    def _named_forward(self, task_ids=None, **kwargs):
        """The task classes' forward: prompt learning (task_ids included), or the base model without PEFT-only
        keyword arguments (adapter_names routed by the forward hooks)."""
        if self._is_prompt_learning:
            return prompt_learning.forward(self, task_ids=task_ids, **kwargs)
        with self._enable_peft_forward_hooks(**kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.base_model(**kwargs)

    def generate(self, *args, **kwargs):
        if self._is_prompt_learning:
            return prompt_learning.generate(self, *args, **kwargs)
        with self._enable_peft_forward_hooks(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model().generate(*args, **kwargs)

    @contextmanager
    def disable_adapter(self):
        """Within the block the model computes exactly the base model; nesting restores the prior state."""
        if self._is_prompt_learning:
            with prompt_learning.disable_adapter(self):
                yield
            return
        was_disabled = self._adapters_disabled
        layers = [m for m in self.base_model.model.modules() if isinstance(m, BaseTunerLayer)]
        states = {m.disable_adapters for m in layers}
        if len(states) > 1:
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. This is "
                "most likely unintentional. After exiting the disable_adapter context, all adapters will be enabled"
            )
        try:
            self.base_model.disable_adapter_layers()
            self._adapters_disabled_flag = True
            yield
        finally:
            if False in states:  # some layer was enabled on entry; layers disabled before stay disabled (PEFT)
                self.base_model.enable_adapter_layers()
            self._adapters_disabled_flag = was_disabled

    # ------------------------------------------------------------------ save / load
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
        if not card.data.pipeline_tag and isinstance(self, PeftModelForCausalLM):
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

    # ------------------------------------------------------------------ status
    def get_layer_status(self):
        from .tuners.status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self):
        from .tuners.status import get_model_status

        return get_model_status(self)


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


# ---------------------------------------------------------------------------- task classes
class PeftModelForCausalLM(PeftModel):
    def __init__(self, model, peft_config, adapter_name="default", **kwargs):
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self.base_model_prepare_inputs_for_generation = getattr(self.base_model, "prepare_inputs_for_generation", None)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        task_ids=None,
        **kwargs,
    ):
        return self._named_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            task_ids=task_ids,
            **kwargs,
        )


class PeftModelForSeq2SeqLM(PeftModel):
    def __init__(self, model, peft_config, adapter_name="default", **kwargs):
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self.base_model_prepare_inputs_for_generation = getattr(self.base_model, "prepare_inputs_for_generation", None)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        decoder_inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        task_ids=None,
        **kwargs,
    ):
        return self._named_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            task_ids=task_ids,
            **kwargs,
        )

    def generate(self, **kwargs):
        # Keyword-only, as PEFT's: positional input_ids raise TypeError for seq2seq models.
        return super().generate(**kwargs)


def _extend_modules_to_save(peft_config, names) -> None:
    if peft_config.modules_to_save is None:
        peft_config.modules_to_save = list(names)
    else:
        peft_config.modules_to_save.extend(names)


class _HeadTrainingModel(PeftModel):
    """SEQ_CLS / TOKEN_CLS / QA: the task head trains in full (modules_to_save extended as PEFT does).

    PEFT extends ``modules_to_save`` in ``__init__`` (SEQ_CLS before building the model, TOKEN_CLS/QA after)
    and again in every ``add_adapter``; prompt-learning models call ``add_adapter`` from ``__init__``, so
    their configs carry the head names twice. Reproduced on purpose: the JSON files must match.
    """

    head_names: list[str] = []
    extend_before_init = True

    def __init__(self, model, peft_config, adapter_name="default", **kwargs):
        if self.extend_before_init:
            _extend_modules_to_save(peft_config, self.head_names)
        super().__init__(model, peft_config, adapter_name, **kwargs)
        if not self.extend_before_init:
            _extend_modules_to_save(peft_config, self.head_names)
            set_trainable_modules(
                self.get_base_model(), adapter_name, peft_config.modules_to_save, peft_config.inference_mode
            )
        self.cls_layer_name = next(
            (name for name, _ in self.get_base_model().named_children() if name in self.head_names), None
        )

    def add_adapter(self, adapter_name, peft_config, low_cpu_mem_usage=False, autocast_adapter_dtype=True):
        _extend_modules_to_save(peft_config, self.head_names)
        super().add_adapter(adapter_name, peft_config, low_cpu_mem_usage, autocast_adapter_dtype)


class PeftModelForSequenceClassification(_HeadTrainingModel):
    head_names = SEQ_CLS_HEAD_NAMES


class PeftModelForTokenClassification(_HeadTrainingModel):
    head_names = SEQ_CLS_HEAD_NAMES
    extend_before_init = False


class PeftModelForQuestionAnswering(_HeadTrainingModel):
    head_names = QA_HEAD_NAMES
    extend_before_init = False


class PeftModelForFeatureExtraction(PeftModel):
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        task_ids=None,
        **kwargs,
    ):
        return self._named_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            task_ids=task_ids,
            **kwargs,
        )
