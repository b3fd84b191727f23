"""Hugging Face ``peft`` interop: PEFT's LoRA layers on peft_kernels' fused op, and whole-model conversion.

The only module of peft_kernels that imports ``peft`` (docs/ARCHITECTURE.md §3), and only inside functions:
importing this module never needs peft.

``patch_peft_model(model)``
    Every PEFT LoRA layer of ``model`` that peft_kernels implements (``lora.Linear`` over Linear or Conv1D,
    ``lora.Embedding``, ``lora.Conv2d``, ``lora.bnb.Linear8bitLt``, ``lora.bnb.Linear4bit``) becomes peft_kernels' layer *in place*: the
    module object stays and only its class changes (to a subclass of both ours and PEFT's class, ours first in
    the MRO). Parameters, buffers, hooks, optimizer state and outside references are untouched, so a PEFT
    training script calls it once after ``get_peft_model`` (before or after creating the optimizer) and its
    LoRA layers run peft_kernels' ops. PEFT's model-level code keeps working on the patched layers: they are
    still ``peft.tuners.lora.LoraLayer`` instances, and ``update_layer`` is PEFT's, so ``add_adapter`` /
    ``set_adapter`` / ``disable_adapter`` / merging / saving behave as in PEFT. ``fuse_layer`` does it for one
    layer; ``patch_peft()`` (``integration/patch.py``) calls it on every layer PEFT creates.
``unpatch_peft_model(model)``
    Gives every patched layer its PEFT class back.
``to_hf_peft(model)`` / ``from_hf_peft(model)``
    A peft_kernels ``PeftModel`` → ``peft.PeftModel`` and back, over the same base model and the same adapter
    Parameter objects (LoRA, incl. several adapters, ``modules_to_save``, merged and disabled states). The
    input wrapper is consumed: its base model now belongs to the returned wrapper.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import warnings
from typing import Any

from torch import nn

# Per-adapter plain dicts and containers of a LoRA layer (PEFT's names; both implementations have them all).
_LAYER_DICTS = ("r", "lora_alpha", "scaling", "use_rslora", "use_dora", "lora_bias")
_LAYER_CONTAINERS = (
    "lora_dropout",
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
)
# Config fields that are not part of an adapter's definition: runtime_config is never serialized and
# peft_version names the library that wrote the config; each side fills its own.
_CONFIG_FIELDS_NOT_CONVERTED = ("runtime_config", "peft_version")


def _import_peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError(
            "peft_kernels.integration.hf_peft needs Hugging Face peft (pip install peft==0.21.2): " + str(exc)
        ) from exc
    return peft


# ---------------------------------------------------------------------------- patching layers in place
def _make_patched_class(ours: type, theirs: type) -> type:
    """``class <ours.__name__>(ours, theirs)``: our forward/merge/adapter state methods, PEFT's type identity.

    MRO: ours, theirs, nn.Module, our LoraLayer, our BaseTunerLayer, PEFT's LoraLayer, PEFT's BaseTunerLayer.
    Everything ours defines wins; PEFT fills the rest (``lora_variants``, ``resolve_lora_variant``, …).
    """

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # PEFT's model calls update_layer(name, r, lora_alpha=..., config=LoraConfig) when it adds an adapter
        # to an existing layer: PEFT's own code builds it, so every init option and check is PEFT's.
        theirs.update_layer(self, adapter_name, *args, **kwargs)
        if self.lora_variant:
            # DoRA and the other variants change the forward; the fused op computes plain LoRA only.
            self.__class__ = theirs
            self.__dict__.pop("_scale_cache", None)
            warnings.warn(
                f"Adapter {adapter_name!r} uses a LoRA variant ({type(self.lora_variant[adapter_name]).__name__}) "
                "that peft_kernels does not fuse; this layer runs PEFT's forward again."
            )

    def __repr__(self) -> str:
        return "lora." + nn.Module.__repr__(self)

    other_param_names = tuple(dict.fromkeys(ours.other_param_names + theirs.other_param_names))
    namespace = {
        "__module__": __name__,
        "__qualname__": f"Patched{theirs.__name__}",
        "__doc__": f"peft_kernels' {ours.__name__} forward on a PEFT {theirs.__name__} (patch_peft_model).",
        "other_param_names": other_param_names,
        "update_layer": update_layer,
        "__repr__": __repr__,
        "_peft_kernels_patched_from": theirs,
    }
    return type(ours.__name__, (ours, theirs), namespace)


@functools.cache
def _patched_classes() -> dict[type, type]:
    """PEFT layer class → its patched class. Built once, on first use (it needs peft)."""
    _import_peft()
    from peft.tuners.lora import layer as peft_layer

    from ..layers import Conv2d, Embedding, Linear

    pairs = {peft_layer.Linear: Linear, peft_layer.Embedding: Embedding, peft_layer.Conv2d: Conv2d}
    try:
        from peft.tuners.lora import bnb as peft_bnb

        from ..layers.lora_4bit import Linear4bit
        from ..layers.lora_int8 import Linear8bitLt
    except ImportError:
        # No bitsandbytes (PEFT then defines no Linear8bitLt / Linear4bit) or no quantized layer: nothing to patch.
        peft_bnb = None
    if peft_bnb is not None and hasattr(peft_bnb, "Linear8bitLt"):
        pairs[peft_bnb.Linear8bitLt] = Linear8bitLt
    if peft_bnb is not None and hasattr(peft_bnb, "Linear4bit"):
        pairs[peft_bnb.Linear4bit] = Linear4bit  # runs ops.lora_linear_4bit
    classes = {}
    for theirs, ours in pairs.items():
        patched = _make_patched_class(ours, theirs)
        # Reachable by module and qualified name, so pickle (torch.save of a whole model, spawn workers) finds it.
        globals()[patched.__qualname__] = patched
        classes[theirs] = patched
    return classes


def is_patched(module: nn.Module) -> bool:
    """True for a PEFT LoRA layer that ``patch_peft_model`` moved onto peft_kernels' forward."""
    return "_peft_kernels_patched_from" in type(module).__dict__


def _patch_refusal(module: nn.Module) -> str | None:
    """Why a PEFT LoRA layer must keep PEFT's forward, or None."""
    variants = getattr(module, "lora_variant", None) or {}
    if variants:
        names = ", ".join(f"{a}: {type(v).__name__}" for a, v in variants.items())
        return f"LoRA variant(s) {names}"
    if getattr(module, "tp_layer", None) is not None:
        return "tensor-parallel LoRA layer"
    if hasattr(module.get_base_layer(), "embed_scale"):
        return "scaled word embedding (PEFT scales the LoRA output by the base layer's embed_scale)"
    return None


def fuse_layer(module: nn.Module) -> str | None:
    """Moves one PEFT LoRA layer onto peft_kernels' class, in place; returns why not (None when it moved).

    Layers already patched, and modules that are not PEFT LoRA layers of a patched kind, give None/a reason
    without being touched. The one place both ``patch_peft_model`` and ``patch_peft()`` change a layer's class.
    """
    if is_patched(module):
        return None
    patched_cls = _patched_classes().get(type(module))
    if patched_cls is None:
        return f"no peft_kernels layer for PEFT's {type(module).__module__}.{type(module).__qualname__}"
    reason = _patch_refusal(module)
    if reason is not None:
        return reason
    module.__class__ = patched_cls
    if "_scale_cache" not in module.__dict__ and hasattr(patched_cls, "int8_weight"):
        module._scale_cache = None  # Linear8bitLt's per-SCB cache of SCB/127
    if "_quant_cache" not in module.__dict__ and hasattr(patched_cls, "quant_weight"):
        module._quant_cache = None  # Linear4bit's cache of its 4-bit operands
    return None


def patch_peft_model(model: nn.Module) -> nn.Module:
    """Moves every PEFT LoRA layer of ``model`` (Linear, Conv1D, Embedding, Conv2d, Linear8bitLt, Linear4bit) onto
    peft_kernels.

    ``model`` is a ``peft.PeftModel`` or any module holding PEFT LoRA layers (``inject_adapter_in_model``,
    transformers' ``add_adapter``). Only the layers' classes change (see the module docstring), so calling it
    before or after building the optimizer is the same. Layers with a LoRA variant (DoRA, …) keep PEFT's
    forward, with one warning listing them. Idempotent; layers added later are patched by calling it again.
    Returns ``model``. ``peft_kernels.patch_peft()`` does the same for every model PEFT builds afterwards.
    """
    peft = _import_peft()
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    from .patch import use_prefix_cache

    if isinstance(model, peft.PeftModel) and getattr(model, "prompt_encoder", None):
        use_prefix_cache(model)  # prefix tuning's cache path (integration/patch.py)
    refused = []
    for name, module in model.named_modules():
        if not isinstance(module, PeftLoraLayer):
            continue
        reason = fuse_layer(module)
        if reason is not None:
            refused.append(f"{name} ({reason})")
    if refused:
        warnings.warn(
            "patch_peft_model: these LoRA layers keep PEFT's forward (peft_kernels fuses plain LoRA only): "
            + "; ".join(refused)
        )
    return model


def unpatch_peft_model(model: nn.Module) -> nn.Module:
    """Gives every layer patched by ``patch_peft_model`` its PEFT class back, in place. Returns ``model``."""
    from .patch import prefix_get_prompt

    if getattr(model.__dict__.get("get_prompt"), "__func__", None) is prefix_get_prompt:
        del model.__dict__["get_prompt"]
    for module in model.modules():
        original = type(module).__dict__.get("_peft_kernels_patched_from")
        if original is not None:
            module.__class__ = original
            module.__dict__.pop("_scale_cache", None)
            module.__dict__.pop("_quant_cache", None)
    return model


# ---------------------------------------------------------------------------- whole-model conversion
def _plain(value):
    """A config field value without either library's enum types (their members are plain strings)."""
    if isinstance(value, enum.Enum):
        return value.value
    return copy.deepcopy(value)


def _convert_config(config, from_peft_type_cls):
    """The same adapter config as the other library's class (``from_peft_type_cls.from_peft_type``)."""
    kwargs = {
        f.name: _plain(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if f.init and f.name not in _CONFIG_FIELDS_NOT_CONVERTED
    }
    return from_peft_type_cls.from_peft_type(**kwargs)


def _strip_tuner_modules(hf_model: nn.Module, lora_types: tuple, wrapper_types: tuple) -> dict[str, nn.Module]:
    """Puts back, in ``hf_model``, the module each LoRA layer / modules_to_save wrapper wraps.

    Returns {module name: removed tuner module}. No parameter is copied or freed: the removed modules keep
    their adapter containers, which the new wrapper adopts afterwards.
    """
    removed: dict[str, nn.Module] = {}
    for name, module in list(hf_model.named_modules()):
        if not name or any(name.startswith(prefix + ".") for prefix in removed):
            continue
        if isinstance(module, lora_types):
            inner = module.base_layer
        elif isinstance(module, wrapper_types):
            inner = module.original_module
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(hf_model.get_submodule(parent_name) if parent_name else hf_model, child, inner)
        removed[name] = module
    return removed


def _adopt_state(new: nn.Module, old: nn.Module, is_wrapper: bool) -> None:
    """Makes ``new`` hold ``old``'s adapter containers (the same Parameter objects) and per-adapter state."""
    if is_wrapper:
        if new.original_module is not old.original_module:
            raise RuntimeError("modules_to_save wrapper conversion lost the original module")
        new.modules_to_save = old.modules_to_save
        new._active_adapter = list(old._active_adapter)
        new._disable_adapters = old._disable_adapters
    else:
        if new.base_layer is not old.base_layer:
            raise RuntimeError("LoRA layer conversion lost the base layer")
        for attr in _LAYER_CONTAINERS:
            setattr(new, attr, getattr(old, attr))
        for attr in _LAYER_DICTS:
            setattr(new, attr, dict(getattr(old, attr)))
        new.merged_adapters = list(old.merged_adapters)
        new._disable_adapters = old._disable_adapters
        active = old._active_adapter
        new._active_adapter = active if isinstance(active, str) else list(active)
    new.training = old.training


def _convert(source: nn.Module, build, add_adapter, lora_types: tuple, wrapper_types: tuple, config_cls):
    """Shared body of to_hf_peft / from_hf_peft (see there). ``build(hf_model, name, cfg)`` → new wrapper."""
    configs = dict(source.peft_config)
    if any(cfg.is_prompt_learning for cfg in configs.values()):
        raise NotImplementedError(
            "Only LoRA models are converted. Prompt-learning checkpoints are the same files in both libraries: "
            "save_pretrained with one and from_pretrained with the other."
        )
    hf_model = source.get_base_model()
    requires_grad = {id(p): p.requires_grad for p in source.parameters()}
    active = source.active_adapter
    if not isinstance(active, str) and len(active) == 1:
        active = active[0]
    removed = _strip_tuner_modules(hf_model, lora_types, wrapper_types)
    # Both libraries warn about, and merge into, a model that already has a peft_config attribute.
    old_model_config = hf_model.__dict__.pop("peft_config", None)

    names = list(configs)
    new_configs = {name: _convert_config(cfg, config_cls) for name, cfg in configs.items()}
    try:
        target = build(hf_model, names[0], new_configs[names[0]])
        for name in names[1:]:
            add_adapter(target, name, new_configs[name])
    except BaseException:
        # Leave the source model as it was: its tuner modules go back in place, the new ones are dropped.
        for name, module in removed.items():
            parent_name, _, child = name.rpartition(".")
            setattr(hf_model.get_submodule(parent_name) if parent_name else hf_model, child, module)
        if old_model_config is not None:
            hf_model.peft_config = old_model_config
        raise
    for name, cfg in new_configs.items():
        # Task classes extend modules_to_save with their head names; the source config already holds them.
        cfg.modules_to_save = copy.deepcopy(configs[name].modules_to_save)
    if isinstance(active, str):
        target.set_adapter(active)
    else:  # several active LoRA adapters: only the tuner accepts a list
        target.base_model.set_adapter(active)
    target.active_adapter = active

    new_modules = dict(hf_model.named_modules())
    for name, old in removed.items():
        new = new_modules.get(name)
        is_wrapper = isinstance(old, wrapper_types)
        if new is None or new is (old.original_module if is_wrapper else old.base_layer):
            raise RuntimeError(f"conversion did not recreate the adapter module {name!r}")
        _adopt_state(new, old, is_wrapper)
    for param in target.parameters():
        if param.device.type == "meta":
            raise RuntimeError("conversion left a parameter on the meta device")
        if id(param) in requires_grad:
            param.requires_grad_(requires_grad[id(param)])
    target.training = source.training
    target.base_model.training = source.base_model.training
    return target


def to_hf_peft(model: nn.Module, patch: bool = False) -> nn.Module:
    """A peft_kernels LoRA ``PeftModel`` as a ``peft.PeftModel`` of the same task class, sharing everything.

    The HF base model and every adapter Parameter (LoRA A/B, ``modules_to_save`` copies) are the same
    objects in the result, so outputs and gradients are PEFT's for the same weights, and an optimizer built
    on ``model.parameters()`` keeps optimizing the result. Configs are converted field by field; active
    adapter, merged/disabled states, ``requires_grad`` flags and train/eval modes carry over. ``model`` is
    consumed (its base model moved to the result). ``patch=True`` also applies ``patch_peft_model``: a real
    ``peft.PeftModel`` (what Trainer/TRL/accelerate recognise) computing with peft_kernels' fused layers.
    """
    peft = _import_peft()
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    from ..layers.int8 import Int8Linear
    from ..layers.lora import LoraLayer
    from ..peft_model import PeftModel
    from ..utils.other import ModulesToSaveWrapper

    if not isinstance(model, PeftModel):
        raise TypeError(f"to_hf_peft expects a peft_kernels PeftModel, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), Int8Linear):
            raise NotImplementedError(
                f"{name} is LoRA over peft_kernels' own Int8Linear, which PEFT cannot load; bitsandbytes "
                "Linear8bitLt bases convert."
            )
        if isinstance(module, PeftLoraLayer):
            raise TypeError(f"{name} is already a PEFT layer; the model is mixed")

    def build(hf_model, name, cfg):
        return peft.get_peft_model(
            hf_model, cfg, adapter_name=name, autocast_adapter_dtype=False, low_cpu_mem_usage=True
        )

    def add_adapter(target, name, cfg):
        target.add_adapter(name, cfg, low_cpu_mem_usage=True, autocast_adapter_dtype=False)

    target = _convert(model, build, add_adapter, (LoraLayer,), (ModulesToSaveWrapper,), peft.PeftConfig)
    return patch_peft_model(target) if patch else target


def from_hf_peft(model: nn.Module) -> nn.Module:
    """A ``peft.PeftModel`` (LoRA, patched or not) as a peft_kernels ``PeftModel``, sharing everything.

    The inverse of ``to_hf_peft``: same base model, same adapter Parameter objects, converted configs,
    states carried over; ``model`` is consumed. Raises NotImplementedError for what peft_kernels does not
    implement (LoRA variants such as DoRA, other layer types, other PEFT methods), before touching the model.
    """
    peft = _import_peft()
    from peft.tuners.lora import LoraLayer as PeftLoraLayer
    from peft.utils.other import ModulesToSaveWrapper as PeftModulesToSaveWrapper

    from ..config import PeftConfig
    from ..mapping_func import get_peft_model

    if not isinstance(model, peft.PeftModel):
        raise TypeError(f"from_hf_peft expects a peft.PeftModel, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, PeftLoraLayer) and getattr(module, "lora_variant", None):
            raise NotImplementedError(f"{name}: {_patch_refusal(module)}, which peft_kernels does not implement")
    for name, cfg in model.peft_config.items():
        # Refuse unsupported settings before the model is touched (injection would refuse them later).
        converted = _convert_config(cfg, PeftConfig)
        unsupported = converted.unsupported_settings() if hasattr(converted, "unsupported_settings") else []
        if unsupported:
            raise NotImplementedError(f"adapter {name!r} uses settings peft_kernels does not implement: {unsupported}")

    def build(hf_model, name, cfg):
        return get_peft_model(hf_model, cfg, adapter_name=name, autocast_adapter_dtype=False)

    def add_adapter(target, name, cfg):
        target.add_adapter(name, cfg, autocast_adapter_dtype=False)

    return _convert(model, build, add_adapter, (PeftLoraLayer,), (PeftModulesToSaveWrapper,), PeftConfig)
