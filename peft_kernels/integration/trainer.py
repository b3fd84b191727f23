"""transformers ``Trainer`` support: a peft_kernels ``PeftModel`` is handled as Trainer handles a PEFT model.

transformers recognises PEFT models only by ``isinstance(model, peft.PeftModel)`` (``trainer_utils._is_peft_model``
and the ``supported_classes`` tuple in ``Trainer._save``). Any other ``nn.Module`` gets its full state dict
written as ``model.safetensors`` at every checkpoint, is resumed by loading that file, and a quantized base
under it is refused ("You cannot perform fine-tuning on purely quantized models"). ``enable_trainer_support``
extends exactly those checks to peft_kernels' ``PeftModel``, so Trainer (and its subclasses, e.g. TRL's
SFTTrainer) checkpoints with ``save_pretrained`` (adapter_model.safetensors + adapter_config.json), resumes
with ``load_adapter``, and with FSDP sets ``fsdp_auto_wrap_policy`` — the same code paths PEFT models take.
accelerate's ``is_peft_model``, which TRL's trainers ask, is extended the same way (``_patch_accelerate``), so
``SFTTrainer(model=<PeftModel>)`` and ``DPOTrainer(model=<PeftModel>, ref_model=None)`` treat it as PEFT's.
Every other model is unaffected.

``import peft_kernels`` calls ``ensure_trainer_support()`` (``peft_kernels/__init__.py``): it patches now if
``transformers.trainer`` is already imported, else right after it is imported (a one-shot import hook), so
importing peft_kernels never imports the Trainer stack. ``PEFT_KERNELS_TRAINER_SUPPORT=0`` turns it off.
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)

_TRAINER_MODULE = "transformers.trainer"
_lock = threading.RLock()
_state = {"patched": False, "hook": None}


def _is_ours(model) -> bool:
    from ..peft_model import PeftModel

    # Trainer passes wrapped models in places (DDP, compile): unwrap the usual wrappers first.
    for attr in ("module", "_orig_mod"):
        while not isinstance(model, PeftModel) and hasattr(model, attr):
            model = getattr(model, attr)
    return isinstance(model, PeftModel)


def _patch_transformers() -> None:
    """Extends transformers' PEFT-model checks to peft_kernels' PeftModel (idempotent)."""
    import transformers.trainer as trainer_mod
    import transformers.trainer_utils as trainer_utils

    from ..peft_model import PeftModel
    from ..utils.other import fsdp_auto_wrap_policy

    original_is_peft = trainer_utils._is_peft_model
    if getattr(original_is_peft, "_peft_kernels", False):
        return

    def _is_peft_model(model):
        return original_is_peft(model) or _is_ours(model)

    _is_peft_model._peft_kernels = True
    trainer_utils._is_peft_model = _is_peft_model
    for name in ("transformers.trainer", "transformers.integrations.neftune"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "_is_peft_model", None) is original_is_peft:
            module._is_peft_model = _is_peft_model

    # Trainer._save builds supported_classes = (PreTrainedModel, PeftModel) when is_peft_available(): isinstance
    # accepts nested tuples, so PeftModel becomes (peft.PeftModel, ours), or (ours,) without peft.
    peft_model_cls = getattr(trainer_mod, "PeftModel", None)
    trainer_mod.PeftModel = (peft_model_cls, PeftModel) if peft_model_cls is not None else (PeftModel,)
    if not trainer_mod.is_peft_available():
        trainer_mod.is_peft_available = lambda: True

    original_fsdp_update = getattr(trainer_mod, "update_fsdp_plugin_peft", None)
    if original_fsdp_update is not None:

        def update_fsdp_plugin_peft(model, accelerator):
            if _is_ours(model):
                accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
                return None
            return original_fsdp_update(model, accelerator)

        trainer_mod.update_fsdp_plugin_peft = update_fsdp_plugin_peft


def _patch_accelerate() -> None:
    """Extends accelerate's ``is_peft_model`` to peft_kernels' PeftModel (idempotent).

    TRL's trainers (SFT, DPO, GRPO, …) decide by ``accelerate.utils.is_peft_model`` whether to unwrap the PEFT
    wrapper (``get_base_model()`` for the fused LM head) and whether the reference model is the same model with
    the adapter disabled (``ref_model=None``); they bind the function at import. So the package attribute is
    replaced (later imports get ours) and so is every already-imported module's binding of the original, except
    ``accelerate.utils.fsdp_utils``, which calls peft's own state-dict functions on what it recognises.
    """
    import accelerate.utils
    import accelerate.utils.modeling as modeling

    original = modeling.is_peft_model
    if getattr(original, "_peft_kernels", False):
        return

    def is_peft_model(model):
        return original(model) or _is_ours(model)

    is_peft_model._peft_kernels = True
    is_peft_model.__wrapped__ = original
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not namespace or namespace.get("is_peft_model") is not original:
            continue
        if module.__name__ != "accelerate.utils.fsdp_utils":
            module.is_peft_model = is_peft_model
    accelerate.utils.is_peft_model = is_peft_model
    modeling.is_peft_model = is_peft_model


def enable_trainer_support() -> bool:
    """Patches transformers' Trainer now (imports it). Returns True when the patch is in place."""
    with _lock:
        if _state["patched"]:
            return True
        try:
            _patch_transformers()
            _patch_accelerate()
        except Exception as exc:  # a transformers whose private names moved: say so once, train as before
            logger.warning(
                "peft_kernels could not register PeftModel with transformers' Trainer (%s: %s); Trainer will "
                "save full model checkpoints for it.",
                type(exc).__name__,
                exc,
            )
            return False
        _state["patched"] = True
        return True


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds module ``fullname`` with the other finders, runs it, removes itself, then calls ``callback()``."""

    def __init__(self, fullname: str, callback) -> None:
        self.fullname = fullname
        self.callback = callback
        self._inner = None

    def find_spec(self, fullname, path, target=None):
        if fullname != self.fullname:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None:
            return spec
        self._inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self.remove()
        # The real loader runs the module; only then can its names be patched.
        self._inner.exec_module(module)
        self.callback()

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)

    def __getattr__(self, name):
        # get_source, get_code, is_package, … of the real loader (inspect, linecache, importlib.resources).
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def ensure_trainer_support() -> None:
    """Patch now if Trainer is imported, else when it is (unless PEFT_KERNELS_TRAINER_SUPPORT=0). Cheap."""
    if _state["patched"] or os.environ.get("PEFT_KERNELS_TRAINER_SUPPORT", "1") == "0":
        return
    if _TRAINER_MODULE in sys.modules:
        enable_trainer_support()
        return
    with _lock:
        if _state["hook"] is None or _state["hook"] not in sys.meta_path:
            _state["hook"] = _AfterImport(_TRAINER_MODULE, enable_trainer_support)
            sys.meta_path.insert(0, _state["hook"])
