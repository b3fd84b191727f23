"""LoRA checkpoints saved with a model's pre-transformers-5 module names, renamed to the names it has now.

transformers 5 renamed the modules of some architectures and loads their old checkpoints through a registered
conversion mapping (``transformers.conversion_mapping``). An adapter trained on the old names stores keys such as
``base_model.model.transformer.h.0.attn.attention.q_proj.lora_A.weight``; on the renamed model that module is
``model.layers.0.self_attn.q_proj``. As PEFT 0.21.2 does, the LoRA keys of such a checkpoint go through the same
renamings before loading:

    <prefix><old module path>.lora_*.<rest>  ->  <prefix><new module path>.lora_*.<rest>

where ``new module path`` is what transformers' renamings make of ``<old module path>.weight`` (minus the suffix).
Only renamings apply: a conversion that merges or splits tensors (fused MoE experts) is not a key rename, and
its keys are left as they are (reported as unexpected on load).
"""

from __future__ import annotations

from torch import nn

_LORA_SEGMENT = ".lora_"


def _renamings_for(model: nn.Module) -> list:
    """transformers' key renamings registered for ``model``'s ``model_type``; [] when there are none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if not model_type:
        return []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # transformers < 5 (no renamed architectures) or absent
        return []
    if get_checkpoint_conversion_mapping(model_type) is None:
        return []
    return [
        t
        for t in get_model_conversion_mapping(base)
        if isinstance(t, WeightRenaming) and not isinstance(t, WeightConverter)
    ]


def rename_legacy_lora_keys(model: nn.Module, state_dict: dict, known_keys) -> dict:
    """``state_dict`` with every LoRA key that ``known_keys`` lacks renamed by the model's transformers renamings.

    A key is renamed only when its renamed form is in ``known_keys`` (the checkpoint keys the model expects), so a
    checkpoint already in the new names, or a model without renamings, passes through unchanged.
    """
    unknown = [k for k in state_dict if _LORA_SEGMENT in k and k not in known_keys]
    if not unknown:
        return state_dict
    renamings = _renamings_for(model)
    if not renamings:
        return state_dict
    from transformers.core_model_loading import rename_source_key

    renamed = dict(state_dict)
    for key in unknown:
        prefix = "base_model.model." if key.startswith("base_model.model.") else ""
        module_path, sep, rest = key[len(prefix) :].partition(_LORA_SEGMENT)
        new_path, _ = rename_source_key(f"{module_path}.weight", renamings, [])
        new_key = f"{prefix}{new_path.removesuffix('.weight')}{sep}{rest}"
        if new_key != key and new_key in known_keys and new_key not in renamed:
            renamed[new_key] = renamed.pop(key)
    return renamed
