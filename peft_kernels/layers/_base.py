"""BaseTunerLayer: adapter bookkeeping shared by every tuner layer (pure torch, no transformers)."""

from __future__ import annotations

import warnings
from typing import Any, Union

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (GPT-2 style, weight stored (in, out)) or a subclass of it,
    recognised from its classes' names and modules so that layers/ never imports transformers. The one test for
    it: tuners/ use it too."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


class BaseTunerLayer:
    """Mixin for layers that wrap a ``base_layer`` and hold per-adapter parameters in ModuleDicts.

    ``adapter_layer_names`` name the ModuleDicts/ParameterDicts holding trainable adapter weights;
    ``other_param_names`` the per-adapter plain dicts (r, scaling, …).
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    _disable_adapters: bool = False
    _active_adapter: Union[str, list[str]] = "default"
    merged_adapters: list[str] = []
    # False: adapters see the input in its own dtype (peft_kernels.helpers.disable_input_dtype_casting).
    cast_input_dtype_enabled: bool = True

    def get_base_layer(self) -> nn.Module:
        base_layer = self
        while hasattr(base_layer, "base_layer"):
            base_layer = base_layer.base_layer
        return base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor:
        return self.get_base_layer().bias

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        if isinstance(self.active_adapter, str):
            return [self.active_adapter]
        return list(self.active_adapter)

    def _get_available_adapters(self) -> set[str]:
        adapters = set()
        for layer_name in self.adapter_layer_names:
            module = getattr(self, layer_name)
            if isinstance(module, (nn.ModuleDict, nn.ParameterDict)):
                adapters.update(module.keys())
        return adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Enables (re-activates the active adapters' gradients) or disables every adapter of this layer."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for layer_name in self.adapter_layer_names:
                getattr(self, layer_name).requires_grad_(False)
            self._disable_adapters = True

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activates ``adapter_names``: their parameters train (unless inference_mode), all others freeze."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for layer_name in self.adapter_layer_names:
            module_dict = getattr(self, layer_name)
            for key, layer in module_dict.items():
                trainable = key in adapter_names and not inference_mode
                if isinstance(layer, nn.Parameter):
                    layer.requires_grad_(trainable)
                else:
                    layer.requires_grad_(trainable)
        self._active_adapter = adapter_names

    def _all_available_adapter_names(self) -> list[str]:
        names = set()
        for name in self.adapter_layer_names + self.other_param_names:
            attr = getattr(self, name)
            if hasattr(attr, "keys"):
                names.update(attr.keys())
        return sorted(names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes every trace of ``adapter_name``; an active one is replaced by the first remaining adapter."""
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        if adapter_name in self.active_adapters:
            active = self.active_adapters[:]
            active.remove(adapter_name)
            if active:
                self.set_adapter(active)
            else:
                remaining = self._all_available_adapter_names()
                if not remaining:
                    self.set_adapter([])
                else:
                    new_active = remaining[0]
                    warnings.warn(
                        f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                        f"{new_active}."
                    )
                    self.set_adapter(remaining[0])

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """Moves the adapter to the base weight's device, and to its dtype when that is floating point.
        nn.MultiheadAttention has no ``weight``: its adapters follow out_proj's (PEFT's rule), so
        ``autocast_adapter_dtype=False`` leaves them in the model's 16-bit dtype."""
        if device is None:
            base_layer = self.get_base_layer()
            if isinstance(base_layer, nn.MultiheadAttention):
                base_layer = base_layer.out_proj
                base_layer = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
            for weight_name in ("weight", "qweight"):
                weight = getattr(base_layer, weight_name, None)
                if weight is not None:
                    device = weight.device
                    dtype = weight.dtype
                    break
            else:
                return
        else:
            dtype = None
        meta = torch.device("meta")
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name, None)
            if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in container:
                continue
            if any(p.device == meta for p in container.parameters()):
                continue
            if dtype is not None and (dtype.is_floating_point or dtype.is_complex):
                container[adapter_name] = container[adapter_name].to(device, dtype=dtype)
            else:
                container[adapter_name] = container[adapter_name].to(device)


def check_adapters_to_merge(module: BaseTunerLayer, adapter_names: Any = None) -> list[str]:
    """The adapters a merge call should merge, with PEFT's warnings for already-merged ones."""
    if adapter_names is None:
        adapter_names = module.active_adapters
    if isinstance(adapter_names, str):
        raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
    if module.merged:
        merged_adapters = set(module.merged_adapters)
        adapter_names = [name for name in adapter_names if name not in merged_adapters]
        if adapter_names:
            warnings.warn(
                f"Already following adapters were merged {','.join(module.merged_adapters)}. "
                f"You are now additionally merging {','.join(adapter_names)}."
            )
        else:
            warnings.warn("All adapters are already merged, nothing to do.")
    return adapter_names
