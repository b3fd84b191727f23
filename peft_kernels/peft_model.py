"""PeftModel: adapters, forward, parameter counting and status (PEFT 0.21.2 API).

LoRA models wrap the base model in ``LoraModel`` (``self.base_model.model`` is the HF model, keys start with
``base_model.model.``). Prompt-learning models keep the HF model as ``self.base_model`` and add
``prompt_encoder``; their forward is ``tuners/prompt_learning.py``, their generate ``tuners/prompt_learning_generation.py``. Saving and loading adapters
is ``checkpoint.py`` (a base class of PeftModel); the task classes (PeftModelForCausalLM, …) are ``task_models.py``,
importable from here as in PEFT. ``get_layer_status``/``get_model_status`` are here, as in PEFT.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from .checkpoint import AdapterCheckpointMixin
from .config import PeftConfig
from .layers._base import BaseTunerLayer
from .mapping import PEFT_TYPE_TO_TUNER_MAPPING
from .tuners import prompt_learning, prompt_learning_generation
from .utils.other import ModulesToSaveWrapper
from .utils.peft_types import TaskType


class PeftModel(AdapterCheckpointMixin, nn.Module):
    """Base model + adapters. ``forward`` runs the base model with the active adapter applied."""

    _task_type: Optional[TaskType] = None  # the task classes' own TaskType; prompt learning reads it

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
            return prompt_learning_generation.generate(self, *args, **kwargs)
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

    # ------------------------------------------------------------------ status
    def get_layer_status(self):
        return get_layer_status(self)

    def get_model_status(self):
        return get_model_status(self)


# ---------------------------------------------------------------------------- status
@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Literal["irregular"]]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    # PEFT's LoRA layers never set a quantization backend (only other tuners do): None for every LoRA layer.
    quantization_backend: Union[str, None] = None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Literal["irregular"]]
    active_adapters: Union[list[str], Literal["irregular"]]
    merged_adapters: Union[list[str], Literal["irregular"]]
    requires_grad: dict[str, Union[bool, Literal["irregular"]]]
    available_adapters: list[str]
    devices: dict[str, list[str]] = field(default_factory=dict)
    quantization_backend: Union[str, None, Literal["irregular"]] = None


def _base_of(model):
    if isinstance(model, PeftModel):
        if model._is_prompt_learning:
            raise TypeError(
                "get_layer_status() got an invalid PeftModel instance; prefix tuning and adaption "
                "prompt are not supported."
            )
        return model.base_model
    return model


def get_layer_status(model: Any) -> list[TunerLayerStatus]:
    base = _base_of(model)
    rows = []
    for name, module in base.named_modules():
        if not isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            continue
        requires_grad: dict[str, Any] = {}
        devices: dict[str, list[str]] = {}
        for layer_name in module.adapter_layer_names:
            container = getattr(module, layer_name)
            for key, item in container.items():
                params = [item] if isinstance(item, torch.nn.Parameter) else list(item.parameters())
                flags = {p.requires_grad for p in params}
                if flags:
                    prev = requires_grad.get(key)
                    value = flags.pop() if len(flags) == 1 else "irregular"
                    requires_grad[key] = value if prev in (None, value) else "irregular"
                devices.setdefault(key, [])
                devices[key] = sorted({*devices[key], *(p.device.type for p in params)})
        rows.append(
            TunerLayerStatus(
                name=name,
                module_type=repr(module).partition("(")[0],
                enabled=not module.disable_adapters,
                active_adapters=module.active_adapters,
                merged_adapters=list(module.merged_adapters),
                requires_grad=requires_grad,
                available_adapters=sorted(module._get_available_adapters()),
                devices=devices,
                quantization_backend=getattr(getattr(module, "quantization_backend", None), "backend_name", None),
            )
        )
    if not rows:
        raise ValueError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT adapters "
            "injected in the model."
        )
    return rows


def _agg(values):
    first = values[0]
    return first if all(v == first for v in values) else "irregular"


def get_model_status(model: Any) -> TunerModelStatus:
    """The layers' statuses aggregated; a field that differs between layers is "irregular" (PEFT's rules)."""
    layers = get_layer_status(model)
    if isinstance(model, PeftModel):
        base_model_type = model.get_base_model().__class__.__name__
        trainable, total = model.get_nb_trainable_parameters()
        peft_types = {k: str(v.peft_type).partition(".")[-1] for k, v in model.base_model.peft_config.items()}
        adapter_model_type = model.base_model.__class__.__name__
    else:
        is_pretrained = any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)
        base_model_type = model.__class__.__name__ if is_pretrained else "other"
        trainable, total = PeftModel.get_nb_trainable_parameters(model)
        peft_types, adapter_model_type = {}, "None"
    requires_grad: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.requires_grad.items():
            prev = requires_grad.get(key)
            requires_grad[key] = value if prev in (None, value) else "irregular"
    devices: dict[str, list[str]] = {}
    for layer in layers:
        for key, devs in layer.devices.items():
            devices[key] = sorted({*devices.get(key, []), *devs})
    # Merged: the union, unless some layer holds one of those adapters unmerged.
    merged_all = {a for layer in layers for a in layer.merged_adapters}
    merged: Union[list[str], str] = sorted(merged_all)
    if any((set(layer.available_adapters) - set(layer.merged_adapters)) & merged_all for layer in layers):
        merged = "irregular"
    active = {tuple(layer.active_adapters) for layer in layers}
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_agg([layer.enabled for layer in layers]),
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters=merged,
        requires_grad=requires_grad,
        available_adapters=sorted({a for layer in layers for a in layer.available_adapters}),
        devices=devices,
        quantization_backend=_agg([layer.quantization_backend for layer in layers]),
    )


_TASK_CLASSES = (
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
)


def __getattr__(name: str):
    # PEFT's path of the task classes; they live in task_models.py, which imports this module.
    if name in _TASK_CLASSES:
        from . import task_models

        return getattr(task_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
