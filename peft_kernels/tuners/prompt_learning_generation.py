"""generate() of prompt-learning adapters (prefix tuning, P-tuning, prompt tuning), PEFT 0.21.2 semantics.

Generation never re-feeds the prompt: a ``prepare_inputs_for_generation`` wrapper injects it on the step whose
cache is still empty, and ``generate`` receives the prefixed attention mask, so transformers' own position and
mask bookkeeping is that of the base model fed the virtual tokens by hand. The prompts, the cache keyword and
the input adjustments are those of the forward (``prompt_learning.py``).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from ..utils.peft_types import PeftType, TaskType
from .prompt_learning import (
    _CACHE_KWARGS,
    _adjust_position_and_token_type_ids,
    _batch_size,
    _prepend_prompts,
    _task_of,
    cache_kwarg_name,
    get_prompt,
)


def _cache_in(model_kwargs: dict):
    """(keyword, cache) of the cache in ``model_kwargs``, keyword None when there is none."""
    for name in _CACHE_KWARGS:
        if name in model_kwargs:
            return name, model_kwargs[name]
    return None, None


def _self_attention_length(cache) -> int:
    if cache is None:
        return 0
    return cache.get_seq_length()


@contextmanager
def _planned_cache_length(base: nn.Module, planned: dict):
    """Records in ``planned["rows"]`` the cache length ``generate`` plans for the real tokens (max_length - 1).

    transformers 5.x passes it to ``_prepare_cache_for_generation(..., max_cache_length)`` (private API, same in
    5.23 and 5.24); when that method or argument is missing nothing is recorded and the fused cache is sized by
    its first update and grows 1.5x when decoding passes it, so the result is the same, only with more copies.
    """
    original = getattr(base, "_prepare_cache_for_generation", None)
    try:
        signature = inspect.signature(original) if original is not None else None
    except (TypeError, ValueError):
        signature = None
    if signature is None or "max_cache_length" not in signature.parameters:
        yield
        return
    had_instance_attr = "_prepare_cache_for_generation" in base.__dict__

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        try:
            value = signature.bind(*args, **kwargs).arguments.get("max_cache_length")
        except TypeError:
            value = None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            planned["rows"] = value
        return original(*args, **kwargs)

    base._prepare_cache_for_generation = wrapper
    try:
        yield
    finally:
        if had_instance_attr:
            base._prepare_cache_for_generation = original
        else:
            del base._prepare_cache_for_generation


@contextmanager
def _patched_prepare_inputs(base: nn.Module, inject):
    """Wraps ``base.prepare_inputs_for_generation`` for one ``generate`` call; restores it in all cases.

    ``inject(original, args, kwargs) -> model_inputs`` decides what to change. ``functools.wraps`` keeps the
    original signature visible: transformers inspects it to validate generate's keyword arguments.
    """
    had_instance_attr = "prepare_inputs_for_generation" in base.__dict__
    original = base.prepare_inputs_for_generation

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return inject(original, args, kwargs)

    base.prepare_inputs_for_generation = wrapper
    try:
        yield
    finally:
        if had_instance_attr:
            base.prepare_inputs_for_generation = original
        else:
            del base.prepare_inputs_for_generation


def generate(peft_model, *args, **kwargs):
    """generate() of the active adapter: greedy output equals the base model fed the virtual tokens by hand.

    Causal LMs: ``generate`` gets ``cat(ones(B, P), attention_mask)`` so position ids and masks are those of the
    prompted sequence; on the step whose cache is empty the wrapper injects the prefix cache (prefix tuning) or
    replaces ``input_ids`` by ``cat(prompts, embed(input_ids))`` (prompt/P-tuning). Later steps feed only the new
    token. The returned ids are ``input_ids`` followed by the new tokens, as in PEFT.
    """
    base = peft_model.base_model
    if peft_model._adapters_disabled:
        return base.generate(*args, **kwargs)
    task = _task_of(peft_model)
    if task == TaskType.SEQ_2_SEQ_LM:
        if args:
            raise TypeError("generate() takes keyword arguments only for sequence-to-sequence models")
        return _generate_seq2seq(peft_model, kwargs)
    if task != TaskType.CAUSAL_LM:
        return base.generate(*args, **kwargs)
    return _generate_causal(peft_model, args, kwargs)


def _generate_causal(peft_model, args: tuple, kwargs: dict):
    base = peft_model.base_model
    config = peft_model.active_peft_config
    nvt = config.num_virtual_tokens
    is_prefix = config.peft_type == PeftType.PREFIX_TUNING
    kwargs = dict(kwargs)
    kwargs.pop("task_ids", None)
    if args:
        if "input_ids" in kwargs or "inputs" in kwargs:
            raise TypeError("generate() got multiple values for argument 'input_ids'")
        kwargs["input_ids"], args = args[0], args[1:]
    input_ids = kwargs.pop("input_ids", None)
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    inputs_embeds = kwargs.get("inputs_embeds")
    batch_size = _batch_size(input_ids, inputs_embeds)
    length = input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1]
    _adjust_position_and_token_type_ids(config, kwargs, drop_token_type_ids=True)
    if kwargs.get("position_ids") is None:
        kwargs.pop("position_ids", None)
    if kwargs.get("token_type_ids") is None:
        kwargs.pop("token_type_ids", None)

    mask = kwargs.get("attention_mask")
    if mask is None:
        device = (input_ids if input_ids is not None else inputs_embeds).device
        mask = torch.ones(batch_size, length, dtype=torch.long, device=device)
    # The virtual tokens are attended to and counted by the position ids transformers derives from the mask.
    kwargs["attention_mask"] = torch.cat((mask.new_ones(batch_size, nvt), mask), dim=1)
    if not is_prefix and inputs_embeds is not None:
        # Embeddings given: the prompted embeddings are simply the generation input.
        kwargs["inputs_embeds"] = _prepend_prompts(peft_model, inputs_embeds)

    planned: dict[str, int] = {}

    def inject(original, call_args, call_kwargs):
        name, cache = _cache_in(call_kwargs)
        first = _self_attention_length(cache) == 0
        if first and is_prefix:
            step_input = call_args[0] if call_args else call_kwargs.get("input_ids")
            rows = step_input.shape[0] if step_input is not None else call_kwargs["inputs_embeds"].shape[0]
            # The prefix, the prompt and every new token but the last (which is never fed back): one allocation.
            max_cache_len = nvt + planned["rows"] if "rows" in planned else None
            call_kwargs[name or cache_kwarg_name(base) or "past_key_values"] = get_prompt(
                peft_model, rows, max_cache_len=max_cache_len
            )
            return original(*call_args, **call_kwargs)
        model_inputs = original(*call_args, **call_kwargs)
        if first and not is_prefix and model_inputs.get("input_ids") is not None:
            step_ids = model_inputs.pop("input_ids")
            model_inputs["input_ids"] = None
            model_inputs["inputs_embeds"] = _prepend_prompts(peft_model, peft_model.word_embeddings(step_ids))
            positions = call_kwargs.get("position_ids")
            if positions is not None:
                # transformers sliced them to the T real tokens; the step now covers P + T positions.
                model_inputs["position_ids"] = positions[..., -(nvt + step_ids.shape[1]) :]
        return model_inputs

    with _patched_prepare_inputs(base, inject), _planned_cache_length(base, planned):
        if input_ids is None:
            return base.generate(*args, **kwargs)
        return base.generate(input_ids, *args, **kwargs)


def _generate_seq2seq(peft_model, kwargs: dict):
    base = peft_model.base_model
    config = peft_model.active_peft_config
    nvt = config.num_virtual_tokens
    if "input_ids" not in kwargs:
        raise ValueError("input_ids must be provided for Peft model generation")
    kwargs = dict(kwargs)
    kwargs.pop("task_ids", None)
    _adjust_position_and_token_type_ids(config, kwargs, drop_token_type_ids=True)
    for key in ("position_ids", "token_type_ids"):
        if key in kwargs and kwargs[key] is None:
            del kwargs[key]

    if config.peft_type != PeftType.PREFIX_TUNING:
        if "encoder_outputs" in kwargs:
            del kwargs["encoder_outputs"]
            warnings.warn(
                "`encoder_outputs` should not be passed to `generate` when using prompt tuning. Ignoring it."
            )
        input_ids = kwargs.pop("input_ids")
        inputs_embeds = peft_model.word_embeddings(input_ids)
        kwargs["inputs_embeds"] = _prepend_prompts(peft_model, inputs_embeds, nvt)
        if kwargs.get("attention_mask") is not None:
            mask = kwargs["attention_mask"]
            kwargs["attention_mask"] = torch.cat((mask.new_ones(mask.shape[0], nvt), mask), dim=1)
        return base.generate(**kwargs)

    if kwargs.get("decoder_attention_mask") is not None:
        mask = kwargs["decoder_attention_mask"]
        kwargs["decoder_attention_mask"] = torch.cat((mask.new_ones(mask.shape[0], nvt), mask), dim=1)

    def inject(original, call_args, call_kwargs):
        name, cache = _cache_in(call_kwargs)
        if _self_attention_length(cache) == 0:
            decoder_ids = (
                call_args[0] if call_args else call_kwargs.get("input_ids", call_kwargs.get("decoder_input_ids"))
            )
            call_kwargs[name or cache_kwarg_name(base) or "past_key_values"] = get_prompt(
                peft_model, decoder_ids.shape[0]
            )
        return original(*call_args, **call_kwargs)

    with _patched_prepare_inputs(base, inject):
        return base.generate(**kwargs)
