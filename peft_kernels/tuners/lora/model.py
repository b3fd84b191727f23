"""LoraModel: which modules get LoRA, with which rank and scaling, and what trains."""

from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from ...layers.int8 import Int8Linear
from ...layers.lora import Embedding, Linear, LoraLayer
from ...layers.lora_conv import Conv1d, Conv2d, Conv3d
from ...layers.lora_mha import MultiheadAttention
from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ..tuners_utils import (
    BaseTuner,
    PeftWarning,
    _get_tuner_state_dict_key_prefixes,
    _is_conv1d,
    _is_key_under_prefixes,
    get_pattern_key,
)


def _is_int8_base(module: nn.Module) -> bool:
    cls = type(module)
    bnb_int8 = cls.__name__ == "Linear8bitLt" and cls.__module__.startswith("bitsandbytes")
    return bnb_int8 or isinstance(module, Int8Linear)


# Base type -> LoRA layer, checked in PEFT's order (Conv2d, Conv3d, Conv1d, MultiheadAttention).
CONV_AND_ATTENTION_LAYERS = {
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
    nn.Conv1d: Conv1d,
    nn.MultiheadAttention: MultiheadAttention,
}
SUPPORTED_BASE_TYPES = (nn.Linear, nn.Embedding, *CONV_AND_ATTENTION_LAYERS)


def _custom_lora_class(config, base: nn.Module):
    """The LoRA class registered for ``base``'s type with ``LoraConfig._register_custom_module``, else None."""
    for base_type, lora_cls in (getattr(config, "_custom_modules", None) or {}).items():
        if isinstance(base, base_type):
            return lora_cls
    return None


class LoraModel(BaseTuner):
    """Injects ``lora.Linear`` / ``Embedding`` / ``Conv1d|2d|3d`` / ``MultiheadAttention`` (``Linear8bitLt`` over
    bnb int8, ``Linear4bit`` over bnb 4-bit, and the classes registered with ``LoraConfig._register_custom_module``).
    """

    prefix: str = "lora_"
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _check_new_adapter_config(self, config) -> None:
        unsupported = config.unsupported_settings()
        if unsupported:
            raise NotImplementedError(
                f"peft_kernels does not implement these LoraConfig settings: {', '.join(unsupported)}. "
                "Use the default value, or Hugging Face PEFT for this variant."
            )
        if config.bias not in ("none", "all", "lora_only"):
            # PEFT 0.21.2 accepts any string in the config and raises NotImplementedError when it marks the
            # trainable parameters (after injecting); we raise the same type before anything is touched.
            raise NotImplementedError(
                f"Requested bias: {config.bias}, is not implemented. Use one of 'none', 'all', 'lora_only'."
            )
        if config.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {config.r}")
        if not 0.0 <= config.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout should be in [0, 1), got {config.lora_dropout}")
        for key, value in (config.rank_pattern or {}).items():
            if value <= 0:
                raise ValueError(
                    f"`r` should be a positive integer value but the value passed is {value} (rank_pattern[{key!r}])"
                )
        if len(self.peft_config) > 1:
            with_bias = [c for c in self.peft_config.values() if c.bias != "none"]
            if len(with_bias) > 1:
                raise ValueError(
                    f"{self.__class__.__name__} supports only 1 adapter with bias. When using multiple adapters, "
                    "set bias to 'none' for all adapters."
                )

    def _check_target_module_compatible(self, config, target: nn.Module, key: str) -> None:
        base = target.get_base_layer() if isinstance(target, LoraLayer) else target
        custom = _custom_lora_class(config, base) is not None
        supported = isinstance(base, SUPPORTED_BASE_TYPES) or _is_conv1d(base) or _is_int8_base(base)
        if not custom and not supported:
            raise ValueError(
                f"Target module {key!r} ({type(base).__name__}) is not supported. Currently, only the following "
                "modules are supported: `torch.nn.Linear`, `torch.nn.Embedding`, `torch.nn.Conv1d`, "
                "`torch.nn.Conv2d`, `torch.nn.Conv3d`, `transformers.pytorch_utils.Conv1D`, "
                "`torch.nn.MultiheadAttention.`, and layer types registered with `LoraConfig._register_custom_module`."
            )
        if custom and not supported:  # PEFT's warning: in/out features of such a layer are guessed, if at all
            warnings.warn(f"Unsupported layer type '{type(base)}' encountered, proceed at your own risk.", UserWarning)
        if config.lora_bias and isinstance(base, nn.Embedding) and not custom:
            raise ValueError(f"lora_bias={config.lora_bias} is not supported for Embedding (module {key!r}).")
        if config.lora_bias and getattr(base, "bias", None) is None:
            warnings.warn(  # PEFT's text and category: merge() later refuses such a layer
                f"`lora_bias=True` was passed but the targeted layer of type {type(base).__name__} has no bias. This "
                "means that merging LoRA weights won't be possible.",
                PeftWarning,
            )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        r_key = get_pattern_key(config.rank_pattern.keys(), current_key)
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), current_key)
        r = config.rank_pattern.get(r_key, config.r)
        alpha = config.alpha_pattern.get(alpha_key, config.lora_alpha)
        kwargs = {
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": config.lora_dropout,
            "init_lora_weights": config.init_lora_weights,
            "use_rslora": config.use_rslora,
            "lora_bias": config.lora_bias,
            "inference_mode": config.inference_mode,
        }
        if isinstance(target, LoraLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = self._create_new_module(config, adapter_name, target, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config, adapter_name, target, **kwargs) -> nn.Module:
        # Dispatch order as PEFT: registered custom types, then bitsandbytes int8, then 4-bit, then the default types.
        custom_cls = _custom_lora_class(config, target)
        if custom_cls is not None:
            # PEFT's call: the LoRA class gets the config too (ours take the settings as keywords as well).
            return custom_cls(target, adapter_name, config=config, **kwargs)
        if _is_int8_base(target):
            from ...layers.lora_int8 import dispatch_bnb_8bit

            module = dispatch_bnb_8bit(target, adapter_name, **kwargs)
            if module is not None:
                return module
        from ...layers.lora_4bit import dispatch_bnb_4bit

        module = dispatch_bnb_4bit(target, adapter_name, **kwargs)
        if module is not None:
            return module
        if isinstance(target, nn.Embedding):
            return Embedding(target, adapter_name, **kwargs)
        for torch_type, lora_type in CONV_AND_ATTENTION_LAYERS.items():
            if isinstance(target, torch_type):
                return lora_type(target, adapter_name, **kwargs)
        if isinstance(target, nn.Linear):
            if config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                    "Setting fan_in_fan_out to False."
                )
                config.fan_in_fan_out = False
            return Linear(target, adapter_name, fan_in_fan_out=False, **kwargs)
        if _is_conv1d(target):
            if not config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True."
                )
                config.fan_in_fan_out = True
            return Linear(target, adapter_name, fan_in_fan_out=True, is_target_conv_1d_layer=True, **kwargs)
        raise ValueError(f"Target module {target} is not supported.")

    @staticmethod
    def _replace_module(parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)
        # Adapter weights live on the base weight's device (they were created on CPU).
        base = child.get_base_layer() if hasattr(child, "get_base_layer") else child
        weight = getattr(base, "weight", None)
        if weight is not None and weight.device.type != "meta":
            for name, module in new_module.named_modules():
                # Adapter modules only; those on meta (low_cpu_mem_usage) are filled on load.
                if LoraModel.prefix in name and not any(p.is_meta for p in module.parameters()):
                    module.to(weight.device)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freezes everything but adapter weights, then re-enables biases per each adapter's ``bias`` mode."""
        # Adapter weights are what tuner layers hold besides base_layer: a base module merely *named* lora_… freezes.
        adapter_prefixes = _get_tuner_state_dict_key_prefixes(model)
        for name, param in model.named_parameters():
            if not _is_key_under_prefixes(name, adapter_prefixes) and "modules_to_save" not in name:
                param.requires_grad = False
        for active_adapter in self.active_adapters:
            bias = self.peft_config[active_adapter].bias
            if bias == "none":
                continue
            if bias == "all":
                for name, param in model.named_parameters():
                    if name == "bias" or name.endswith(".bias"):
                        param.requires_grad = True
            elif bias == "lora_only":
                for module in model.modules():
                    if isinstance(module, LoraLayer) and getattr(module.get_base_layer(), "bias", None) is not None:
                        module.get_base_layer().bias.requires_grad = True

    def disable_adapter_layers(self) -> None:
        for active_adapter in self.active_adapters:
            bias = self.peft_config[active_adapter].bias
            if bias != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the "
                    "same output as the base model would without adaption."
                )
        super().disable_adapter_layers()

    def set_scale(self, adapter: str, scale: float) -> None:
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.set_scale(adapter, scale)

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: Optional[int] = None,
        svd_clamp: Optional[float] = None,
        svd_full_matrices: bool = True,
        svd_driver: Optional[str] = None,
        density: Optional[float] = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Adds ``adapter_name``, the weighted combination of ``adapters`` (types and math: ``lora/weighted.py``)."""
        from .weighted import add_weighted_adapter

        add_weighted_adapter(
            self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, svd_full_matrices,
            svd_driver, density, majority_sign_method,
        )  # fmt: skip
