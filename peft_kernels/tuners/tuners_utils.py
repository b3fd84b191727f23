"""BaseTuner: target matching, injection with rollback, merge/unload walks. Shared by the LoRA tuner."""

from __future__ import annotations

import difflib
import re
import warnings
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional, Union

from torch import nn

from ..layers._base import BaseTunerLayer, check_adapters_to_merge, is_conv1d  # noqa: F401 - PEFT exposes them here
from ..utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND, SEQ_CLS_HEAD_NAMES
from ..utils.other import ModulesToSaveWrapper, _get_submodules
from ..utils.peft_types import TaskType
from ._tuner_keys import (  # noqa: F401 - PEFT exposes these in tuners_utils
    _filter_state_dict_by_key_prefixes,
    _find_minimal_target_modules,
    _get_tuner_state_dict_key_prefixes,
    _is_key_under_prefixes,
    _remove_adapter_name_from_state_dict_key,
    get_model_config,
    minimize_target_modules,
)


class PeftError(Exception):
    """Base class of peft_kernels' own errors (same name as PEFT's)."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """No module of the model matched the adapter's target_modules."""


class PeftWarning(UserWarning):
    """Warnings specific to PEFT semantics."""


class _ExcludedModule:
    """Marker: the key matched exclude_modules or modules_to_save."""

    def __bool__(self):
        return False


def match_target_against_key(target_pattern: str, key: str):
    return re.fullmatch(target_pattern, key)


def check_target_module_exists(config, key: str):
    """True / re.Match when ``key`` is targeted, _ExcludedModule when excluded, False/None otherwise."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return _ExcludedModule()
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return _ExcludedModule()
    modules_to_save = getattr(config, "modules_to_save", None)
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save):
        return _ExcludedModule()
    target_modules = config.target_modules
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return match_target_against_key(target_modules, key)
    if key in target_modules:
        return True  # an exact name bypasses layers_to_transform
    found = any(key.endswith(f".{t}") for t in target_modules)
    layer_indexes = getattr(config, "layers_to_transform", None)
    layers_pattern = getattr(config, "layers_pattern", None)
    using_indexes = layer_indexes is not None and (
        len(layer_indexes) != 0 if isinstance(layer_indexes, list) else True
    )
    if using_indexes and found:
        match = None
        if not layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
            for pattern in patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layer_indexes if isinstance(layer_indexes, int) else index in layer_indexes
    return found


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """The first rank/alpha pattern that matches the whole key or a dotted suffix of it, else the key itself."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def _model_config_dict(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        return {"model_type": "custom"}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config) if isinstance(config, dict) else {"model_type": "custom"}


_is_conv1d = is_conv1d  # the one Conv1D test, layers/_base.py (the name tuners/lora/model.py imports)


def expand_all_linear(peft_config, model: nn.Module):
    """``target_modules="all-linear"`` → the set of full names of every Linear/Conv1D but the output head."""
    target_modules = getattr(peft_config, "target_modules", None)
    if not (isinstance(target_modules, str) and target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return peft_config
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or _is_conv1d(module):
            names.add(name)
        elif isinstance(module, BaseTunerLayer) and "Linear" in type(module).__name__:
            names.add(name)
    exclude = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output_emb = get_output() if callable(get_output) else None
    if output_emb is not None:
        exclude.update(name for name, module in model.named_modules() if module is output_emb)
    elif peft_config.task_type == TaskType.SEQ_CLS:
        for head in SEQ_CLS_HEAD_NAMES:
            cls_head = getattr(model, head, None)
            if cls_head is not None:
                exclude.update(name for name, module in model.named_modules() if module is cls_head)
                break
    for prefix, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for suffix, _ in module.named_modules():
                if suffix:
                    exclude.add(f"{prefix}.{suffix}")
    peft_config.target_modules = names - exclude
    return peft_config


def _close_matches(target_modules, model: nn.Module) -> str:
    """' Did you mean …?' built from module-name suffixes that resemble the requested targets."""
    if target_modules is None or isinstance(target_modules, str):
        return ""
    leaf_names = sorted({name.split(".")[-1] for name, _ in model.named_modules() if name})
    suggestions = []
    for target in sorted(target_modules):
        suggestions += difflib.get_close_matches(target.split(".")[-1], leaf_names, n=3, cutoff=0.5)
    suggestions = sorted(set(suggestions))
    return f" Did you mean one of {suggestions}?" if suggestions else ""


class BaseTuner(nn.Module):
    """Wraps a model and injects one tuner layer per targeted module (``self.model`` is the wrapped model)."""

    prefix: str = ""
    target_module_mapping: dict = {}
    # Whether adapters share model-level state (VeRA-style); LoRA's do not.
    uses_shared_state: bool = False
    get_model_config = staticmethod(get_model_config)

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        self.model = model
        self.targeted_module_names: list[str] = []
        if not hasattr(self, "peft_config"):
            self.peft_config = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        else:
            warnings.warn(
                "Already found a `peft_config` attribute in the model. This will lead to having multiple adapters"
                " in the model. Make sure to know what you are doing!"
            )
            if isinstance(peft_config, dict):  # PeftModel passes {adapter_name: config}
                self.peft_config.update(peft_config)
            else:
                self.peft_config[adapter_name] = peft_config
        self.active_adapter: Union[str, list[str]] = adapter_name
        try:
            self.inject_adapter(self.model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        except BaseException:
            self.peft_config.pop(adapter_name, None)
            raise
        self.model.peft_config = self.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def forward(self, *args: Any, **kwargs: Any):
        return self.model.forward(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ----------------------------------------------------------------- injection
    def _prepare_adapter_config(self, peft_config, model_config: dict):
        if peft_config.target_modules is None:
            target_modules = self.target_module_mapping.get(model_config.get("model_type"))
            if target_modules is None:
                raise ValueError("Please specify `target_modules` or `target_parameters`in `peft_config`")
            peft_config.target_modules = target_modules if isinstance(target_modules, str) else set(target_modules)
        return peft_config

    def _check_new_adapter_config(self, config) -> None:
        """Hook for method-specific checks of a new adapter's config; raise to refuse it."""

    def _check_target_module_compatible(self, config, target: nn.Module, key: str) -> None:
        """Hook: raise NotImplementedError naming the module type when it cannot be adapted."""

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        raise NotImplementedError

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        raise NotImplementedError

    def inject_adapter(self, model: nn.Module, adapter_name: str, low_cpu_mem_usage: bool = False) -> None:
        """Finds the targets, checks all of them, then replaces; any failure undoes every replacement."""
        peft_config = self.peft_config[adapter_name]
        self._check_new_adapter_config(peft_config)
        model_config = _model_config_dict(model)
        peft_config = self._prepare_adapter_config(peft_config, model_config)
        peft_config = expand_all_linear(peft_config, model)
        minimize_target_modules(peft_config, [key for key, _ in model.named_modules()])
        # Adding an adapter leaves the trainability of every existing parameter as it was (PEFT); the first
        # injection freezes the base model instead.
        requires_grad_before = []
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            requires_grad_before = [(p, p.requires_grad) for p in model.parameters()]

        matched, excluded, unmatched = [], [], []
        tuner_children = set()
        for prefix, module in model.named_modules():
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                tuner_children.update(f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix)
        for key, _ in model.named_modules():
            if not key or key in tuner_children:
                continue
            result = check_target_module_exists(peft_config, key)
            if isinstance(result, _ExcludedModule):
                excluded.append(key)
            elif result:
                matched.append(key)
            else:
                unmatched.append(key)
        if not matched:
            self._raise_no_match(peft_config, model, excluded, unmatched)
        for key in matched:
            self._check_target_module_compatible(peft_config, model.get_submodule(key), key)
        _warn_unmatched_patterns(peft_config, matched)

        replaced: list[tuple[nn.Module, str, nn.Module]] = []
        updated: list[BaseTunerLayer] = []
        targeted_before = list(self.targeted_module_names)
        try:
            for key in matched:
                parent, target, target_name = _get_submodules(model, key)
                was_tuner = isinstance(target, BaseTunerLayer)
                with _new_parameters_on_meta(low_cpu_mem_usage):
                    self._create_and_replace(peft_config, adapter_name, target, target_name, parent, current_key=key)
                if was_tuner:
                    updated.append(target)
                else:
                    replaced.append((parent, target_name, target))
                if key not in self.targeted_module_names:  # listed once, however many adapters target it
                    self.targeted_module_names.append(key)
            self._set_modules_to_save(model, peft_config, adapter_name)
        except BaseException:
            for parent, target_name, original in reversed(replaced):
                setattr(parent, target_name, original)
            for layer in updated:
                layer.delete_adapter(adapter_name)
            self._unset_modules_to_save(model, adapter_name)
            self.targeted_module_names = targeted_before
            raise
        if peft_config.exclude_modules and not excluded:
            warnings.warn(
                f"You have passed exclude_modules={peft_config.exclude_modules} but no modules were excluded. "
                "Please check that exclude_modules was set correctly."
            )
        self.set_adapter(self.active_adapters)
        self._mark_only_adapters_as_trainable(model)
        if peft_config.inference_mode:
            for name, param in model.named_parameters():
                if adapter_name in name:
                    param.requires_grad = False
        for param, requires_grad in requires_grad_before:
            param.requires_grad = requires_grad

    def _raise_no_match(self, peft_config, model, excluded, unmatched) -> None:
        if excluded and not unmatched:
            raise NoMatchingPeftModuleError(
                "All modules were excluded. This is likely unintended. "
                "Check your `target_modules`, `exclude_modules` and `modules_to_save` configuration."
            )
        if not peft_config.target_modules:
            raise NoMatchingPeftModuleError(
                "No `target_modules` passed but also no `target_parameters` found. Please check the values for "
                "these arguments."
            )
        if excluded:
            msg = (
                "No modules were targeted for adaptation. This might be caused by a combination of mismatched "
                "target modules and excluded modules. Please check your `target_modules` and `exclude_modules` "
                "configuration. You may also have only targeted modules that are marked to be saved "
                "(`modules_to_save`)."
            )
        else:
            msg = (
                f"Target modules {peft_config.target_modules} not found in the base model. "
                "Please check the target modules and try again."
            )
        if getattr(peft_config, "layers_to_transform", None) is not None:
            msg += f" Note: You specified 'layers_to_transform': {peft_config.layers_to_transform}."
        if getattr(peft_config, "layers_pattern", None) is not None:
            msg += f" You also specified 'layers_pattern': {peft_config.layers_pattern}."
        msg += _close_matches(peft_config.target_modules, model)
        raise NoMatchingPeftModuleError(msg)

    def _set_modules_to_save(self, model: nn.Module, peft_config, adapter_name: str) -> None:
        names = getattr(peft_config, "modules_to_save", None)
        if names:
            set_trainable_modules(model, adapter_name, names, inference_mode=peft_config.inference_mode)

    def _unset_modules_to_save(self, model: nn.Module, adapter_name: str) -> None:
        for name, module in list(model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                module.delete_adapter(adapter_name)
                if not module.modules_to_save:
                    parent, _, target_name = _get_submodules(model, name)
                    setattr(parent, target_name, module.original_module)

    # ----------------------------------------------------------------- adapter state
    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for module in self.model.modules():  # checked before anything changes
            if isinstance(module, ModulesToSaveWrapper):
                copies = [n for n in names if n in module.modules_to_save]
                if len(copies) > 1:  # a module copy is not additive: two active copies of one module can't both run
                    raise ValueError(f"Only one adapter can be set at a time for {module}, got {len(copies)}")
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                if module.merged:
                    warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                    module.unmerge()
                module.set_adapter(names, inference_mode=inference_mode)
            elif isinstance(module, ModulesToSaveWrapper):
                # An adapter without a copy here deactivates the wrapper: the original module runs (as PEFT).
                active = [n for n in names if n in module.modules_to_save]
                module.set_adapter(active[:1], inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def _set_adapter_layers(self, enabled: bool = True) -> None:
        for module in self.model.modules():
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(enabled=True)

    def disable_adapter_layers(self) -> None:
        self._set_adapter_layers(enabled=False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        merged = [
            name
            for name, module in self.model.named_modules()
            if isinstance(module, BaseTunerLayer) and adapter_name in module.merged_adapters
        ]
        if merged:
            raise ValueError(
                f"Cannot delete adapter(s) {[adapter_name]!r} while they are merged. Please unmerge them first."
            )
        del self.peft_config[adapter_name]
        new_active = None
        for module in self.model.modules():
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                module.delete_adapter(adapter_name)
                if isinstance(module, BaseTunerLayer):
                    new_active = module.active_adapters
        self._unset_modules_to_save(self.model, adapter_name)
        if adapter_name in self.active_adapters:
            remaining = [a for a in self.active_adapters if a != adapter_name]
            if not remaining:
                remaining = new_active or list(self.peft_config)[:1]
            self.active_adapter = remaining[0] if len(remaining) == 1 else remaining
        if self.active_adapter:
            # Only the wrappers follow the new active adapter: set_adapter would also unmerge merged layers,
            # which deleting an (unmerged) adapter must not do (PEFT leaves them merged).
            names = self.active_adapters
            for module in self.model.modules():
                if isinstance(module, ModulesToSaveWrapper):
                    module.set_adapter([n for n in names if n in module.modules_to_save][:1])

    # ----------------------------------------------------------------- merge / unload
    def _check_merge_allowed(self) -> None:
        if getattr(self.model, "quantization_method", None) == "gptq":
            raise ValueError("Cannot merge LORA layers when the model is gptq quantized")

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_merge_allowed()
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.unmerge()

    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False, adapter_names=None
    ) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        keys = [key for key, _ in self.model.named_modules() if self.prefix not in key]
        for key in keys:
            try:
                parent, target, target_name = _get_submodules(self.model, key)
            except AttributeError:
                continue  # an ancestor was already replaced
            if hasattr(target, "unload_and_optionally_merge_module"):  # layers that unwrap themselves (MHA)
                setattr(
                    parent, target_name, target.unload_and_optionally_merge_module(merge, safe_merge, adapter_names)
                )
            elif isinstance(target, BaseTunerLayer):
                if merge:
                    target.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                setattr(parent, target_name, target.get_base_layer())
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        model = self._unload_and_optionally_merge(
            progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        if hasattr(model, "peft_config"):
            del model.peft_config
        return model

    def unload(self) -> nn.Module:
        model = self._unload_and_optionally_merge(merge=False)
        if hasattr(model, "peft_config"):
            del model.peft_config
        return model

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Routes ``adapter_names`` (mixed batches) to every tuner layer for the duration of a forward.

        With beam search (``num_beams`` > 1 among the generate kwargs) each name is repeated once per beam, as
        generate repeats each sample; an encoder-decoder's encoder still sees one name per input sample.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        # As PEFT: a name is known when at least one tuner layer holds it (a typo is caught, not skipped).
        expected = set()
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                expected |= module._get_available_adapters()
        unique = {name for name in adapter_names if name != "__base__"}
        unknown = unique - expected
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams")
        per_input = adapter_names
        if isinstance(num_beams, int) and num_beams > 1:
            if not isinstance(adapter_names, (list, tuple)):
                raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        encoder = self.model.get_encoder() if hasattr(self.model, "get_encoder") else None
        encoder_layers = set()
        if per_input is not adapter_names and encoder is not None and encoder is not self.model:
            encoder_layers = {
                id(m) for m in encoder.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))
            }
        handles = []

        def pre_hook(names, module, args, kwargs):
            kwargs["adapter_names"] = names
            return args, kwargs

        for module in self.model.modules():
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                names = per_input if id(module) in encoder_layers else adapter_names
                handles.append(module.register_forward_pre_hook(partial(pre_hook, names), with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def _new_parameters_on_meta(enabled: bool):
    """With ``low_cpu_mem_usage=True`` (PEFT's rule) the adapter parameters registered while the layers are built
    live on the meta device: nothing is allocated or initialised until a checkpoint is loaded into them
    (``set_peft_model_state_dict(..., low_cpu_mem_usage=True)`` assigns the tensors). Buffers are unaffected."""
    if not enabled:
        yield
        return
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and type(param) is nn.Parameter and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _warn_unmatched_patterns(peft_config, targeted: list[str]) -> None:
    """PEFT's RuntimeWarning for rank_pattern / alpha_pattern keys that match no targeted module (a typo)."""
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(peft_config, attr, None) or {}
        unmatched = sorted(p for p in patterns if not any(re.match(rf"(.*\.)?({p})$", name) for name in targeted))
        if unmatched:
            warnings.warn(
                f"The following {attr} keys did not match any targeted module and were ignored: {unmatched}.",
                RuntimeWarning,
            )


def set_trainable_modules(model: nn.Module, adapter_name: str, module_names, inference_mode: bool = False) -> None:
    """Wraps every module whose name (or dotted suffix) is in ``module_names`` in a ModulesToSaveWrapper."""
    # Plain suffix match, as PEFT's _set_trainable (so "classifier" also matches "pre_classifier").
    keys = [key for key, _ in model.named_modules() if any(key.endswith(name) for name in module_names)]
    for key in keys:  # all checked before anything is wrapped
        grandparent = model.get_submodule(".".join(key.split(".")[:-2])) if key.count(".") >= 2 else None
        if isinstance(grandparent, BaseTunerLayer):
            # e.g. modules_to_save=["foo"] with adapter "foo" matches "...q_proj.lora_A.foo" (PEFT raises too)
            raise ValueError(
                f"You are trying to target a module with {ModulesToSaveWrapper} that is a child of "
                f"{type(grandparent)}. This is almost certainly not the intended behavior. Please ensure that the "
                f"adapter name, '{adapter_name}', does not conflict with any of the targeted modules."
            )
    for key in keys:
        parent, target, target_name = _get_submodules(model, key)
        if isinstance(target, ModulesToSaveWrapper):
            target.update(adapter_name)
            target.set_adapter(target.active_adapters)
        elif not any(isinstance(m, ModulesToSaveWrapper) for m in _ancestors(model, key)):
            wrapper = ModulesToSaveWrapper(target, adapter_name)
            wrapper.set_adapter(adapter_name, inference_mode=inference_mode)
            setattr(parent, target_name, wrapper)


def _ancestors(model: nn.Module, key: str):
    parts = key.split(".")
    for i in range(1, len(parts)):
        yield model.get_submodule(".".join(parts[:i]))
