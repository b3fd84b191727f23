"""LoraModel: which modules get LoRA, with which rank and scaling, and what trains."""

from __future__ import annotations

import warnings

from torch import nn

from ...layers.int8 import Int8Linear
from ...layers.lora import Conv2d, Embedding, Linear, LoraLayer
from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ..tuners_utils import BaseTuner, _is_conv1d, get_pattern_key


def _is_int8_base(module: nn.Module) -> bool:
    cls = type(module)
    bnb_int8 = cls.__name__ == "Linear8bitLt" and cls.__module__.startswith("bitsandbytes")
    return bnb_int8 or isinstance(module, Int8Linear)


class LoraModel(BaseTuner):
    """Injects ``lora.Linear`` / ``lora.Embedding`` / ``lora.Conv2d`` (``lora.Linear8bitLt`` / ``lora.Linear4bit`` over bnb)."""

    prefix: str = "lora_"
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _check_new_adapter_config(self, config) -> None:
        unsupported = config.unsupported_settings()
        if unsupported:
            raise NotImplementedError(
                f"peft_kernels does not implement these LoraConfig settings: {', '.join(unsupported)}. "
                "Use the default value, or Hugging Face PEFT for this variant."
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
        if isinstance(base, (nn.Linear, nn.Embedding, nn.Conv2d)) or _is_conv1d(base) or _is_int8_base(base):
            if config.lora_bias and isinstance(base, nn.Embedding):
                raise ValueError(f"lora_bias={config.lora_bias} is not supported for Embedding (module {key!r}).")
            return
        raise NotImplementedError(
            f"Target module {key!r} of type {type(base).__name__} is not supported by peft_kernels LoRA. "
            "Supported types: torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d, transformers Conv1D, "
            "bitsandbytes Linear8bitLt, peft_kernels Int8Linear."
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
        # Dispatch order as PEFT: bitsandbytes int8, then bitsandbytes 4-bit, then the default types.
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
        if isinstance(target, nn.Conv2d):
            return Conv2d(target, adapter_name, **kwargs)
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
        raise NotImplementedError(f"peft_kernels LoRA does not support modules of type {type(target).__name__}")

    @staticmethod
    def _replace_module(parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)
        # Adapter weights live on the base weight's device (they were created on CPU).
        base = child.get_base_layer() if hasattr(child, "get_base_layer") else child
        weight = getattr(base, "weight", None)
        if weight is not None:
            for name, module in new_module.named_modules():
                if LoraModel.prefix in name and weight.device.type != "meta":
                    module.to(weight.device)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freezes everything but adapter weights, then re-enables biases per each adapter's ``bias`` mode."""
        for name, param in model.named_parameters():
            if self.prefix not in name and "modules_to_save" not in name:
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

    def add_weighted_adapter(self, *args, **kwargs):
        raise NotImplementedError("add_weighted_adapter is not implemented by peft_kernels yet.")
