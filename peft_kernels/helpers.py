"""Small user-facing helpers (PEFT's ``peft.helpers``)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from functools import update_wrapper
from types import MethodType
from typing import Union

from torch import nn

from .config import PeftConfig
from .layers._base import BaseTunerLayer
from .layers.lora import LoraLayer


def _takes_only_args_kwargs(method) -> bool:
    params = inspect.signature(method).parameters
    return set(params) == {"args", "kwargs"} or set(params) == {"kwargs"}


def _copy_signature(model, method_name: str) -> None:
    method = getattr(model, method_name)
    func = deepcopy(method.__func__)
    update_wrapper(
        func, getattr(type(model.get_base_model()), method_name), assigned=("__doc__", "__name__", "__annotations__")
    )
    setattr(model, method_name, MethodType(func, model))


def update_forward_signature(model) -> None:
    """Gives ``model.forward`` (``*args, **kwargs``) the base model's forward docstring and annotations."""
    params = inspect.signature(model.forward).parameters
    if len(params) == 2 and "args" in params and "kwargs" in params:
        _copy_signature(model, "forward")


def update_generate_signature(model) -> None:
    """Same for ``model.generate`` when the model has one."""
    if hasattr(model, "generate") and _takes_only_args_kwargs(model.generate):
        _copy_signature(model, "generate")


def update_signature(model, method: str = "all") -> None:
    """``method``: "forward", "generate" or "all"."""
    if method == "forward":
        update_forward_signature(model)
    elif method == "generate":
        update_generate_signature(model)
    elif method == "all":
        update_forward_signature(model)
        update_generate_signature(model)
    else:
        raise ValueError(f"method {method} is not supported please choose one of ['forward', 'generate', 'all']")


def check_if_peft_model(model_name_or_path: str) -> bool:
    """Whether ``model_name_or_path`` (a folder or Hub id) holds a readable ``adapter_config.json``."""
    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:
        return False
    return True


@contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: Union[float, int]) -> Iterator[None]:
    """Multiplies every LoRA scaling by ``multiplier`` inside the block (wise-ft for multiplier ∈ [0, 1]).

    The original scaling dicts are put back on exit, also when the block raises.
    """
    if not isinstance(multiplier, (float, int)):
        raise TypeError(f"Argument multiplier should be of type float, got {type(multiplier)}")
    originals = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            originals[module] = module.scaling
            module.scaling = {k: v * multiplier for k, v in module.scaling.items()}
    if not originals:
        raise ValueError("scaling is only supported for models with `LoraLayer`s")
    try:
        yield
    finally:
        for module, scaling in originals.items():
            module.scaling = scaling


@contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True):
    """Inside the block, tuner layers feed the adapter the input in its own dtype (no cast to the adapter's).

    For callers that manage dtypes themselves (e.g. layerwise upcasting in diffusers).
    """
    if not active:
        yield
        return
    originals = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            originals[name] = module.cast_input_dtype_enabled
            module.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and name in originals:
                module.cast_input_dtype_enabled = originals[name]
