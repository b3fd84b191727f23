"""get_layer_status / get_model_status: what each tuner layer holds and whether it is merged or enabled."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch

from ..layers._base import BaseTunerLayer
from ..utils.other import ModulesToSaveWrapper


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
    from ..peft_model import PeftModel

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
    from ..peft_model import PeftModel

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
