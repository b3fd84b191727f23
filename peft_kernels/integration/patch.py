"""``peft_kernels.patch_peft()``: every model Hugging Face ``peft`` builds from now on runs on peft_kernels.

One line before a training stack that calls ``peft`` itself (TRL's ``peft_config=``, Axolotl, LLaMA-Factory,
transformers' ``model.add_adapter``), in the manner of Liger-Kernel's ``apply_liger_kernel_to_*()``::

    import peft_kernels
    peft_kernels.patch_peft()

What it changes, process-wide, until ``unpatch_peft()``:

- **LoRA layers.** Each LoRA layer PEFT *creates* (``LoraModel._create_and_replace``: the one function every
  route goes through — ``get_peft_model``, ``PeftModel.from_pretrained``, ``add_adapter``, ``load_adapter``,
  ``inject_adapter_in_model`` and so transformers' ``add_adapter`` / ``load_adapter``) is moved onto
  peft_kernels' layer right after PEFT built it, by ``hf_peft.fuse_layer`` (the mechanism of
  ``patch_peft_model``): Linear / Conv1D, Embedding, Conv2d and bitsandbytes Linear8bitLt.
- **Prefix tuning.** A prompt-learning ``peft.PeftModel`` set up while patched (``PeftModel._setup_prompt_encoder``,
  run by every route that adds a prompt-learning adapter) gets an instance-level ``get_prompt`` that builds
  prefix tuning's key/value cache with peft_kernels' cache path (``tuners/prefix_cache_builder.build_prefix_cache``:
  the prefix computed once, unbatched, and written with ``ops.prefix_kv_write``) instead of PEFT's per-row
  encoder calls and legacy-cache conversion. Prompt and P-tuning keep PEFT's forward (nothing to fuse).
- **What stays PEFT's.** A LoRA layer configuration peft_kernels does not fuse (DoRA and other variants, layer
  types without a peft_kernels layer) and every other PEFT method keep PEFT's forward; each injection that
  leaves something unfused logs one line saying which layers and why.

Why a class swap at creation, not a new ``forward`` on PEFT's classes. Replacing ``peft.tuners.lora.Linear.forward``
would change every model already built (the contract is that ``patch_peft()`` changes none: that is
``patch_peft_model``'s job) and would need all of peft_kernels' layer methods grafted onto PEFT's class. Moving
each new layer to ``class Linear(peft_kernels Linear, peft.tuners.lora.Linear)`` instead keeps:

- ``isinstance`` with PEFT's own classes true everywhere (TRL, accelerate, transformers, PEFT itself), and
  ``PeftModel`` / ``LoraModel`` are PEFT's untouched objects;
- the same module objects, Parameters and names, so ``state_dict`` and ``save_pretrained`` files are
  byte-identical to unpatched PEFT's, and ``unpatch_peft_model(model)`` turns a model back at any time;
- one hook point for every creation route, chosen after PEFT's own dispatch (quantized bases, device maps,
  ``low_cpu_mem_usage`` on the meta device) ran unchanged.

``unpatch_peft()`` puts the original functions back (the very objects, saved from the classes' ``__dict__``);
layers created meanwhile keep peft_kernels' forward until ``unpatch_peft_model(model)``. Both calls are
idempotent and serialised by a lock. A ``peft`` outside ``TESTED_PEFT`` warns once and patches nothing.
"""

from __future__ import annotations

import functools
import logging
import threading
import types
import warnings
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# The PEFT releases whose private hook points (LoraModel._create_and_replace, BaseTuner.inject_adapter,
# PeftModel._setup_prompt_encoder, get_prompt's signature) this module was tested against.
TESTED_PEFT = (">=0.21.0", "<0.22")

_lock = threading.RLock()
_saved: dict[tuple[type, str], object] = {}  # (class, attribute) → original __dict__ entry, while patched
_version_warned = False
_local = threading.local()  # per thread: the list collecting unfused layers of the injection in progress


def _peft_version_ok(peft) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return Version(peft.__version__) in SpecifierSet(",".join(TESTED_PEFT))


def is_peft_patched() -> bool:
    """Whether ``patch_peft()`` is in effect."""
    return bool(_saved)


def patch_peft() -> bool:
    """Makes every LoRA / prefix-tuning model ``peft`` builds from now on run on peft_kernels (module docstring).

    Models built before the call are unchanged (``patch_peft_model(model)`` moves one). Idempotent and
    thread-safe. Returns True when the patch is in place, False when this ``peft`` version is outside
    ``TESTED_PEFT`` (then nothing is patched, with one warning per process).
    """
    global _version_warned
    from .hf_peft import _import_peft

    peft = _import_peft()
    with _lock:
        if _saved:
            return True
        if not _peft_version_ok(peft):
            if not _version_warned:
                _version_warned = True
                warnings.warn(
                    f"peft_kernels.patch_peft() was tested with peft {', '.join(TESTED_PEFT)}; peft "
                    f"{peft.__version__} is installed, so nothing is patched and PEFT runs as it is. "
                    "peft_kernels.get_peft_model (the native API) does not depend on the peft version."
                )
            return False
        from peft import PeftModel
        from peft.tuners.lora.model import LoraModel
        from peft.tuners.tuners_utils import BaseTuner

        from .hf_peft import _patched_classes

        _patched_classes()  # build the classes now: a missing piece fails here, before anything is patched
        replacements = {
            (LoraModel, "_create_and_replace"): _wrap_create_and_replace,
            (BaseTuner, "inject_adapter"): _wrap_inject_adapter,
            (PeftModel, "_setup_prompt_encoder"): _wrap_setup_prompt_encoder,
        }
        for (owner, name), wrap in replacements.items():
            original = owner.__dict__[name]
            wrapped = wrap(original)
            wrapped.__wrapped__ = original
            wrapped._peft_kernels_patch = True
            _saved[(owner, name)] = original
            setattr(owner, name, wrapped)
        return True


def unpatch_peft() -> None:
    """Puts back PEFT's original functions (the same objects). Idempotent; layers already built stay as they are."""
    with _lock:
        for (owner, name), original in _saved.items():
            setattr(owner, name, original)
        _saved.clear()


# ---------------------------------------------------------------------------- LoRA layers
@contextmanager
def _collecting_unfused():
    """Collects (layer name, reason) of the layers one injection leaves on PEFT's forward (nesting-safe)."""
    outer = getattr(_local, "unfused", None)
    _local.unfused = []
    try:
        yield _local.unfused
    finally:
        _local.unfused = outer


def _wrap_create_and_replace(original):
    @functools.wraps(original)
    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        from .hf_peft import fuse_layer

        original(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)
        created = getattr(parent, target_name, None)
        if created is None or created is target:
            # An existing layer got one more adapter (its update_layer ran): its class, chosen when it was
            # created, stays. A layer of a model built before patch_peft() is never touched.
            return
        reason = fuse_layer(created)
        unfused = getattr(_local, "unfused", None)
        if reason is not None and unfused is not None:
            unfused.append((current_key, reason))

    return _create_and_replace


def _wrap_inject_adapter(original):
    @functools.wraps(original)
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        from peft.tuners.lora.model import LoraModel

        with _collecting_unfused() as unfused:
            result = original(self, model, adapter_name, *args, **kwargs)
        lora_hooked = isinstance(self, LoraModel) and getattr(
            type(self)._create_and_replace, "_peft_kernels_patch", False
        )
        if not lora_hooked:
            config = self.peft_config.get(adapter_name) if isinstance(self.peft_config, dict) else None
            method = getattr(getattr(config, "peft_type", None), "value", type(self).__name__)
            logger.info(
                "peft_kernels.patch_peft: adapter %r (%s) keeps PEFT's forward: peft_kernels fuses LoRA and "
                "prefix tuning only.",
                adapter_name,
                method,
            )
        elif unfused:
            by_reason: dict[str, list[str]] = {}
            for name, reason in unfused:
                by_reason.setdefault(reason, []).append(name)
            logger.warning(
                "peft_kernels.patch_peft: adapter %r: %d LoRA layer(s) keep PEFT's forward: %s",
                adapter_name,
                len(unfused),
                "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items()),
            )
        return result

    return inject_adapter


# ---------------------------------------------------------------------------- prefix tuning
def _wrap_setup_prompt_encoder(original):
    @functools.wraps(original)
    def _setup_prompt_encoder(self, adapter_name):
        original(self, adapter_name)
        use_prefix_cache(self)

    return _setup_prompt_encoder


def use_prefix_cache(peft_model) -> None:
    """Gives one ``peft.PeftModel`` peft_kernels' prefix cache path: an instance-level ``get_prompt``.

    Per instance, not on PEFT's class: models built before ``patch_peft()`` keep PEFT's path, and a model built
    while patched keeps ours after ``unpatch_peft()``, as its LoRA layers do (``unpatch_peft_model`` removes it).
    """
    if "get_prompt" not in peft_model.__dict__:
        peft_model.__dict__["get_prompt"] = types.MethodType(prefix_get_prompt, peft_model)


def _uses_our_prefix_cache(peft_model, task_ids) -> bool:
    from peft.utils import TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING, PeftType

    config = peft_model.active_peft_config
    if task_ids is not None or config.peft_type != PeftType.PREFIX_TUNING:
        return False
    if config.num_transformer_submodules != 1:
        return False  # encoder-decoder models keep PEFT's EncoderDecoderCache construction
    # Models whose legacy cache PEFT post-processes (Bloom's layout) keep PEFT's path.
    model_type = getattr(getattr(peft_model, "config", None), "model_type", None)
    return TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING.get(model_type) is None


def prefix_get_prompt(self, batch_size, task_ids=None, max_cache_len=None):
    """PEFT's ``get_prompt`` contract; for prefix tuning, the cache ``tuners/prefix_cache_builder.build_prefix_cache`` builds."""
    if not _uses_our_prefix_cache(self, task_ids):
        return type(self).get_prompt(self, batch_size, task_ids=task_ids, max_cache_len=max_cache_len)
    from ..tuners.prefix_cache_builder import build_prefix_cache
    from ..tuners.prompt_learning import _unbatched_kv_prefix

    config = self.active_peft_config
    return build_prefix_cache(
        _unbatched_kv_prefix(self, self.active_adapter),
        batch_size,
        config.num_transformer_submodules,
        getattr(self.get_base_model(), "config", None),
        max_cache_len=max_cache_len,
    )
