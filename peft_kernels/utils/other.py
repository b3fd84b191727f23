"""ModulesToSaveWrapper and the model-preparation utilities of PEFT's ``utils.other``."""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from typing import Optional, Union

import torch
from torch import nn

from .constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # noqa: F401 - PEFT exposes it here


def _get_submodules(model: nn.Module, key: str):
    """(parent, target, target_name) of the module at dotted path ``key``."""
    parent = model.get_submodule(".".join(key.split(".")[:-1])) if "." in key else model
    target_name = key.split(".")[-1]
    target = model.get_submodule(key)
    return parent, target, target_name


class ModulesToSaveWrapper(nn.Module):
    """Trains and saves a full copy of a module per adapter; the original stays frozen.

    Children: ``original_module`` and ``modules_to_save`` (ModuleDict adapter -> deepcopy). Checkpoint keys
    drop the ``modules_to_save.<adapter>.`` part.
    """

    # What get_layer_status reads from every adapter-holding module (PEFT's AuxiliaryTrainingWrapper names).
    adapter_layer_names: tuple[str, ...] = ("modules_to_save",)
    other_param_names: tuple[str, ...] = ()
    merged_adapters: list[str] = []  # a trained copy is never merged

    def _get_available_adapters(self) -> set[str]:
        return set(self.modules_to_save.keys())

    def __init__(self, module_to_save: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter = [adapter_name]
        self._disable_adapters = False
        self.update(adapter_name)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_modules" not in self.__dict__ or "original_module" not in self.__dict__["_modules"]:
                raise
            modules = self.__dict__["_modules"]
            active = self.__dict__.get("_active_adapter", [])
            if (
                not self.__dict__.get("_disable_adapters", False)
                and active
                and active[0] in modules["modules_to_save"]
            ):
                return getattr(modules["modules_to_save"][active[0]], name)
            return getattr(modules["original_module"], name)

    def update(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)
        if adapter_name in self._active_adapter:
            self.modules_to_save[adapter_name].requires_grad_(True)
        else:
            self.modules_to_save[adapter_name].requires_grad_(False)

    def forward(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if self._disable_adapters or not any(a in self.modules_to_save for a in self._active_adapter):
            return self.original_module(*args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(*args, adapter_names=adapter_names, **kwargs)
        return self.modules_to_save[self._active_adapter[0]](*args, **kwargs)

    def _mixed_batch_forward(self, x, *args, adapter_names, **kwargs):
        outputs = []
        for i, name in enumerate(adapter_names):
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            outputs.append(module(x[i : i + 1], *args, **kwargs))
        return torch.cat(outputs, dim=0)

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.original_module.requires_grad_(False)
            for name in self._active_adapter:
                if name in self.modules_to_save:
                    self.modules_to_save[name].requires_grad_(True)
            self._disable_adapters = False
        else:
            self.original_module.requires_grad_(False)
            self.modules_to_save.requires_grad_(False)
            self._disable_adapters = True

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        if len(adapter_names) > 1:
            raise ValueError(f"Attempted to set multiple ({adapter_names}) adapters at once for modules_to_save.")
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name in adapter_names and not inference_mode)
        self._active_adapter = list(adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            return
        del self.modules_to_save[adapter_name]
        if adapter_name in self._active_adapter:
            remaining = list(self.modules_to_save.keys())
            self._active_adapter = remaining[:1]

    def adapter_state_dict(self, adapter_name: str, state_dict: dict) -> dict:
        """Keys of this wrapper's ``state_dict`` for one adapter, without the ``modules_to_save.<a>.`` part."""
        prefix = f"modules_to_save.{adapter_name}."
        return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict:
        """checkpoint suffix -> model suffix, the inverse of adapter_state_dict."""
        if adapter_name not in self.modules_to_save:
            return {}
        return {k: f"modules_to_save.{adapter_name}.{k}" for k in self.modules_to_save[adapter_name].state_dict()}

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
        # Disabling does not count (PEFT 0.21.2): unload() inside disable_adapter() still returns the active copy.
        if not self._active_adapter or self._active_adapter[0] not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self._active_adapter[0]]


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[dict] = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Freezes the model, upcasts 16-bit non-quantized params to fp32, and prepares gradient checkpointing.

    Steps (PEFT 0.21.2): (1) requires_grad=False everywhere; (2) unless GPTQ/AQLM/EETQ/HQQ/torchao quantized,
    cast fp16/bf16 parameters that are not Params4bit to fp32 (int8 weights are untouched); (3) for 8/4-bit
    models with gradient checkpointing: enable input require-grads (unless use_reentrant=False), then
    ``gradient_checkpointing_enable``. Returns the same model.
    """
    loaded_in_kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    method = getattr(model, "quantization_method", None)
    other_quant = method in ("gptq", "aqlm", "eetq", "torchao", "hqq") or getattr(model, "hqq_quantized", False)
    if gradient_checkpointing_kwargs is None:
        gradient_checkpointing_kwargs = {}
    for param in model.parameters():
        param.requires_grad = False
    if not other_quant:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and param.__class__.__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if (loaded_in_kbit or other_quant) and use_gradient_checkpointing:
        if gradient_checkpointing_kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:

                def make_inputs_require_grad(module, inputs, output):
                    output.requires_grad_(True)

                model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)
        supports_kwargs = (
            "gradient_checkpointing_kwargs" in inspect.signature(model.gradient_checkpointing_enable).parameters
        )
        if not supports_kwargs and gradient_checkpointing_kwargs:
            warnings.warn(
                "gradient_checkpointing_kwargs is not supported in this version of transformers. The passed kwargs "
                "will be ignored. if you want to use that feature, please upgrade to the latest version of "
                "transformers."
            )
        extra = {} if not supports_kwargs else {"gradient_checkpointing_kwargs": gradient_checkpointing_kwargs}
        model.gradient_checkpointing_enable(**extra)
    return model


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Casts trainable params to fp32 and every other param/buffer to ``dtype`` (PEFT's AMP helper)."""
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.to(dtype)
        else:
            param.data = param.to(torch.float32)
    for buf in model.buffers():
        buf.data = buf.to(dtype)


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Shifts ids one position right, inserting ``decoder_start_token_id`` and replacing -100 by the pad id."""
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    if pad_token_id is None:
        raise ValueError("self.model.config.pad_token_id has to be defined.")
    shifted.masked_fill_(shifted == -100, pad_token_id)
    return shifted


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


def _fsdp_block_classes(model: nn.Module) -> tuple[type, ...]:
    """The transformer block classes to shard one by one: FSDP_TRANSFORMER_CLS_TO_WRAP, else _no_split_modules."""
    by_name = {type(m).__name__: type(m) for m in model.modules()}
    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if names is not None:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise ValueError(
                f"FSDP_TRANSFORMER_CLS_TO_WRAP names {missing}, which are not module classes of the model."
            )
        return tuple(by_name[n] for n in wanted)
    # _no_split_modules may name classes a given configuration does not instantiate: those are skipped.
    found = []
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or ():
            if name in by_name and by_name[name] not in found:
                found.append(by_name[name])
    return tuple(found)


def fsdp_auto_wrap_policy(model: nn.Module):
    """An FSDP ``auto_wrap_policy`` for a PeftModel: one unit per LoRA layer and per transformer block.

    Units (besides the root): every LoRA layer (base layer + its A/B together), every prompt encoder, and every
    transformer block (``FSDP_TRANSFORMER_CLS_TO_WRAP`` as accelerate reads it, else the model's
    ``_no_split_modules``). Unlike PEFT's policy, LoRA A/B are not units of their own: the fused LoRA forward
    reads the base weight, A and B inside the LoRA layer's own forward, so they must be gathered by the same
    unit (an A/B unit would only be gathered around a forward of A/B that never runs). A unit thus mixes a
    frozen base weight with trainable A/B, which FSDP2 always allows and FSDP1 with ``use_orig_params=True``
    (Trainer's default; ``accelerate launch`` needs ``--fsdp_use_orig_params true``). For FSDP2, apply ``fully_shard`` bottom-up to the modules for which
    ``policy(module, False, 0)`` is True, then to the root.
    Returns ``policy(module, recurse, nonwrapped_numel) -> bool`` (PEFT's name and calling convention).
    """
    # The encoder modules themselves, not the tuners package (which imports this module).
    from ..layers._base import BaseTunerLayer
    from ..tuners.p_tuning.model import PromptEncoder
    from ..tuners.prefix_tuning.model import PrefixEncoder
    from ..tuners.prompt_tuning.model import PromptEmbedding

    unit_classes = _fsdp_block_classes(model) + (BaseTunerLayer, PrefixEncoder, PromptEncoder, PromptEmbedding)

    def policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if recurse:
            return True  # always look further down; the decision is made per module below
        return isinstance(module, unit_classes)

    return policy
