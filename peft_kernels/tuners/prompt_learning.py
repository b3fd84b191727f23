"""Prompt learning inside PeftModel: prefix tuning, P-tuning and prompt tuning (PEFT 0.21.2 semantics).

Notation: ``P`` num_virtual_tokens, ``N = P·nts`` encoder rows (nts = num_transformer_submodules, 2 for
SEQ_2_SEQ_LM), ``L`` num_layers, ``D`` token_dim, ``B`` batch, ``T`` sequence length.

- Prompt tuning / P-tuning: ``inputs_embeds = cat(prompts[:P or N], embed(input_ids))``, the attention mask is
  prefixed with P ones, causal-LM labels with P × -100; outputs cover ``P + T`` positions.
- Prefix tuning: the encoder output ``[P, L·2·D]`` becomes a per-layer K/V cache (``prefix_cache_builder.py``) passed under
  the cache keyword the model's forward declares (``cache`` on transformers ≥ 5.24, else ``past_key_values``);
  outputs cover ``T`` positions whose position ids start at P.

The encoders run once on the unbatched virtual tokens and their output is broadcast over the batch, which equals
PEFT's B identical encoder calls in value and, through expand's backward, in gradient (a sum over the batch).

``generate`` is ``prompt_learning_generation.py``.
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..utils.other import ModulesToSaveWrapper
from ..utils.peft_types import PeftType, TaskType
from .prefix_cache_builder import build_prefix_cache, unbatched_prefix
from .tuners_utils import set_trainable_modules

_CACHE_KWARGS = ("cache", "past_key_values")  # transformers ≥ 5.24 name first, then the older one

# Positional parameter order of each task class's forward (docs/PEFT_CONTRACT.md §5.3); keyword names are the contract.
_FORWARD_PARAMS = {
    TaskType.CAUSAL_LM: (
        "input_ids", "attention_mask", "inputs_embeds", "labels", "output_attentions", "output_hidden_states",
        "return_dict", "task_ids",
    ),
    TaskType.SEQ_CLS: (
        "input_ids", "attention_mask", "inputs_embeds", "labels", "output_attentions", "output_hidden_states",
        "return_dict", "task_ids",
    ),
    TaskType.TOKEN_CLS: (
        "input_ids", "attention_mask", "inputs_embeds", "labels", "output_attentions", "output_hidden_states",
        "return_dict", "task_ids",
    ),
    TaskType.FEATURE_EXTRACTION: (
        "input_ids", "attention_mask", "inputs_embeds", "output_attentions", "output_hidden_states", "return_dict",
        "task_ids",
    ),
    TaskType.SEQ_2_SEQ_LM: (
        "input_ids", "attention_mask", "inputs_embeds", "decoder_input_ids", "decoder_attention_mask",
        "decoder_inputs_embeds", "labels", "output_attentions", "output_hidden_states", "return_dict", "task_ids",
    ),
    TaskType.QUESTION_ANS: (
        "input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "start_positions",
        "end_positions", "output_attentions", "output_hidden_states", "return_dict", "task_ids",
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------- config and setup
def prepare_prompt_learning_config(peft_config, model_config):
    """Fills the ``None`` dimension fields of ``peft_config`` from the model config (docs/PEFT_CONTRACT.md §3.4).

    num_layers ← num_hidden_layers | num_layers | n_layer;  token_dim ← hidden_size | n_embd | d_model;
    num_attention_heads ← num_attention_heads | n_head | num_heads | encoder_attention_heads.
    Prefix tuning on a GQA model (``num_key_value_heads`` in the config): hd = head_dim (or token_dim // heads),
    token_dim ← hd · num_key_value_heads, num_attention_heads ← num_key_value_heads, because the prefix is written
    into the K/V cache, which holds key/value heads only. encoder_hidden_size ← token_dim when None.
    """
    config_dict = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    if "text_config" in config_dict:  # VLMs: the language model's dimensions
        config_dict = config_dict["text_config"]

    def first_key(field_name, keys):
        for key in keys:
            if key in config_dict:
                return config_dict[key]
        raise ValueError(f"Please specify `{field_name}` in `peft_config`")

    if peft_config.num_layers is None:
        # transformers ≥ 5 dropped num_hidden_layers from to_dict() for some models; the attribute is the source.
        if hasattr(model_config, "num_hidden_layers"):
            peft_config.num_layers = model_config.num_hidden_layers
        else:
            peft_config.num_layers = first_key("num_layers", ("num_hidden_layers", "num_layers", "n_layer"))
    if peft_config.token_dim is None:
        peft_config.token_dim = first_key("token_dim", ("hidden_size", "n_embd", "d_model"))
    if peft_config.num_attention_heads is None:
        peft_config.num_attention_heads = first_key(
            "num_attention_heads", ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
        )
    if peft_config.peft_type == PeftType.PREFIX_TUNING and "num_key_value_heads" in config_dict:
        head_dim, num_kv_heads = _kv_head_shape(config_dict, peft_config)
        peft_config.token_dim = head_dim * num_kv_heads
        peft_config.num_attention_heads = num_kv_heads
    if getattr(peft_config, "encoder_hidden_size", None) is None:
        # On PromptTuningConfig this is not a dataclass field: it becomes a plain attribute and is not serialized.
        peft_config.encoder_hidden_size = peft_config.token_dim
    return peft_config


def _kv_head_shape(config_dict: dict, peft_config) -> tuple[int, int]:
    """(head_dim, num_kv_heads) the prefix is provisioned for; heterogeneous models get their largest layer's."""
    if config_dict.get("global_head_dim") is not None:
        return config_dict["global_head_dim"], (
            config_dict.get("num_global_key_value_heads") or config_dict["num_key_value_heads"]
        )
    if config_dict.get("per_layer_config") is not None:
        # to_dict() keeps only per-layer overrides; the base values come from the top level.
        base_head_dim = config_dict.get("head_dim", peft_config.token_dim // peft_config.num_attention_heads)
        head_dim, num_kv = base_head_dim, config_dict["num_key_value_heads"]
        for layer_cfg in config_dict["per_layer_config"].values():
            layer_head_dim = layer_cfg.get("head_dim", base_head_dim)
            if layer_head_dim > head_dim:
                head_dim, num_kv = layer_head_dim, layer_cfg.get("num_key_value_heads", num_kv)
        return head_dim, num_kv
    if config_dict.get("head_dim") is not None:
        return config_dict["head_dim"], config_dict["num_key_value_heads"]
    return peft_config.token_dim // peft_config.num_attention_heads, config_dict["num_key_value_heads"]


def add_adapter(peft_model, adapter_name: str, peft_config, low_cpu_mem_usage: bool = False) -> None:
    """Builds adapter ``adapter_name`` (not activated): derived fields, frozen base, encoder, modules_to_save.

    ``low_cpu_mem_usage`` has no effect: the encoders are small and are always created on the model's device.
    """
    nvt = peft_config.num_virtual_tokens
    if not isinstance(nvt, int) or isinstance(nvt, bool) or nvt <= 0:
        method = getattr(peft_config.peft_type, "value", peft_config.peft_type)
        raise ValueError(f"{method} needs `num_virtual_tokens` to be a positive integer, got {nvt!r}.")
    base = peft_model.base_model
    if peft_config.peft_type == PeftType.PREFIX_TUNING and any(
        getattr(module, "gradient_checkpointing", False) for module in base.modules()
    ):
        # The prefix lives in a Cache object that checkpointed layers would re-run against twice.
        raise ValueError(f"{PeftType.PREFIX_TUNING.value} does not work with gradient checkpointing.")
    prepare_prompt_learning_config(peft_config, base.config)
    if peft_config.num_transformer_submodules is None:
        peft_config.num_transformer_submodules = 2 if peft_config.task_type == TaskType.SEQ_2_SEQ_LM else 1

    for param in base.parameters():
        param.requires_grad = False
    _find_backbone_and_embeddings(peft_model)
    encoder = _build_encoder(peft_model, peft_config).to(_device_of(base))
    if "prompt_encoder" not in peft_model._modules:
        peft_model.prompt_encoder = nn.ModuleDict({})
        peft_model.prompt_tokens = {}
    peft_model.prompt_encoder[adapter_name] = encoder
    peft_model.prompt_tokens[adapter_name] = torch.arange(nvt * peft_config.num_transformer_submodules).long()
    if peft_config.modules_to_save:
        set_trainable_modules(base, adapter_name, peft_config.modules_to_save, peft_config.inference_mode)


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _find_backbone_and_embeddings(peft_model) -> None:
    """Sets ``transformer_backbone_name`` (first PreTrainedModel child, "" = the model) and ``word_embeddings``."""
    from transformers import PreTrainedModel

    base = peft_model.base_model
    backbone, backbone_name = base, ""
    for name, child in base.named_children():
        if isinstance(child, PreTrainedModel):
            backbone, backbone_name = child, name
            break
    peft_model.transformer_backbone_name = backbone_name

    word_embeddings = None
    try:  # BERT-style models name it; others are found by their vocab-sized first dimension
        word_embeddings = base.get_submodule("embeddings.word_embeddings")
    except AttributeError:
        pass
    if word_embeddings is None:
        config = base.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab_size = text_config.vocab_size
        for name, param in backbone.named_parameters():
            shape = getattr(param, "ds_shape", None) or param.shape  # DeepSpeed ZeRO-3 shards to shape [0]
            if shape[0] == vocab_size:
                word_embeddings = backbone.get_submodule(name.removesuffix(".weight"))
                break
    peft_model.word_embeddings = word_embeddings


def _build_encoder(peft_model, peft_config) -> nn.Module:
    if peft_config.peft_type == PeftType.PROMPT_TUNING:
        from .prompt_tuning.model import PromptEmbedding

        return PromptEmbedding(peft_config, peft_model.word_embeddings)
    if peft_config.peft_type == PeftType.P_TUNING:
        from .p_tuning.model import PromptEncoder

        return PromptEncoder(peft_config)
    if peft_config.peft_type == PeftType.PREFIX_TUNING:
        from .prefix_tuning.model import PrefixEncoder

        return PrefixEncoder(peft_config)
    raise NotImplementedError(f"peft_type {peft_config.peft_type!r} is not a prompt-learning method of peft_kernels.")


def _wrappers(peft_model) -> list[ModulesToSaveWrapper]:
    return [m for m in peft_model.base_model.modules() if isinstance(m, ModulesToSaveWrapper)]


def set_adapter(peft_model, adapter_name: str, inference_mode: bool = False) -> None:
    """Activates ``adapter_name``; modules_to_save wrappers without it fall back to their original module.

    As in PEFT, prompt encoders keep their ``requires_grad`` (they are separate modules, not a shared layer).
    """
    for wrapper in _wrappers(peft_model):
        if adapter_name in wrapper.modules_to_save:
            wrapper.set_adapter(adapter_name, inference_mode=inference_mode)
        else:
            wrapper.set_adapter([], inference_mode=inference_mode)


def delete_adapter(peft_model, adapter_name: str) -> None:
    """Removes every trace of ``adapter_name``; deleting the active adapter activates the first remaining one."""
    del peft_model.peft_config[adapter_name]
    del peft_model.prompt_encoder[adapter_name]
    del peft_model.prompt_tokens[adapter_name]
    remaining = list(peft_model.peft_config)
    for wrapper in _wrappers(peft_model):
        wrapper.delete_adapter(adapter_name)
    # active_adapter, not active_adapters: the base model is a transformers model whose own ``active_adapters``
    # method (its PEFT integration) is not this model's state.
    active = peft_model.active_adapter
    if adapter_name != active and adapter_name not in (active if isinstance(active, list) else [active]):
        return
    if not remaining:
        peft_model.active_adapter = []
        return
    warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {remaining[0]}.")
    peft_model.active_adapter = remaining[0]
    set_adapter(peft_model, remaining[0])


# ---------------------------------------------------------------------------- prompts
def _unbatched_prompts(peft_model, adapter_name: str) -> torch.Tensor:
    """Prompt/P-tuning rows [N, D] of ``adapter_name`` (encoder output, or the stored rows in inference mode)."""
    config = peft_model.peft_config[adapter_name]
    encoder = peft_model.prompt_encoder[adapter_name]
    if config.inference_mode:
        return encoder.embedding.weight
    tokens = peft_model.prompt_tokens[adapter_name].to(encoder.embedding.weight.device)
    # A batch of one: the LSTM's batch_first layout, and bitwise the rows PEFT computes for batch row 0.
    return encoder(tokens.unsqueeze(0))[0]


def _unbatched_kv_prefix(peft_model, adapter_name: str) -> torch.Tensor:
    """Prefix [L, 2, H, P, hd] of ``adapter_name`` in the base model's dtype (see prefix_cache_builder.py for the layout)."""
    config = peft_model.peft_config[adapter_name]
    encoder = peft_model.prompt_encoder[adapter_name]
    if config.inference_mode:
        flat = encoder.embedding.weight
    else:
        tokens = peft_model.prompt_tokens[adapter_name][: config.num_virtual_tokens]
        flat = encoder(tokens.unsqueeze(0).to(encoder.embedding.weight.device))[0]
    dtype = getattr(peft_model.base_model, "dtype", None)
    if dtype is not None:
        flat = flat.to(dtype)
    return unbatched_prefix(flat, config.num_layers, config.num_attention_heads)


def get_prompt(peft_model, batch_size: int, task_ids=None, max_cache_len: int | None = None):
    """Active adapter's prompt for a batch of ``batch_size``.

    Prefix tuning: a fresh transformers Cache with ``get_seq_length() == P`` and per-layer keys
    ``[B, H, P, hd]``: ``PrefixKVCache`` (a ``DynamicCache`` with preallocated buffers of ``max_cache_len`` rows,
    P + T_max) for one submodule, ``EncoderDecoderCache`` for two (``prefix_cache_builder.build_prefix_cache``).
    Prompt/P-tuning: ``[B, N, D]`` (a broadcast view of one encoder output). ``task_ids`` is accepted for PEFT's
    signature.
    """
    adapter_name = peft_model.active_adapter
    config = peft_model.peft_config[adapter_name]
    if config.peft_type == PeftType.PREFIX_TUNING:
        prefix = _unbatched_kv_prefix(peft_model, adapter_name)
        return build_prefix_cache(
            prefix,
            batch_size,
            config.num_transformer_submodules,
            getattr(peft_model.base_model, "config", None),
            max_cache_len=max_cache_len,
        )
    prompts = _unbatched_prompts(peft_model, adapter_name)
    return prompts.unsqueeze(0).expand(batch_size, -1, -1)


def get_prompt_embedding_to_save(peft_model, adapter_name: str) -> torch.Tensor:
    """The checkpoint's ``prompt_embeddings``: encoder output for the adapter's tokens, detached, on CPU.

    Prefix tuning: [P, L·2·D] (the projection is folded in); prompt/P-tuning: [N, D].
    """
    config = peft_model.peft_config[adapter_name]
    encoder = peft_model.prompt_encoder[adapter_name]
    tokens = peft_model.prompt_tokens[adapter_name]
    if config.peft_type == PeftType.PREFIX_TUNING:
        tokens = tokens[: config.num_virtual_tokens]
    with torch.no_grad():
        embeddings = encoder(tokens.unsqueeze(0).to(encoder.embedding.weight.device))
    return embeddings[0].detach().cpu()


# ---------------------------------------------------------------------------- forward
def _task_of(peft_model) -> TaskType | None:
    """The TaskType of the PeftModel's task class (None for a plain PeftModel)."""
    return getattr(peft_model, "_task_type", None)


def cache_kwarg_name(module: nn.Module) -> str | None:
    """``cache`` or ``past_key_values``, whichever ``module.forward`` declares (None if neither)."""
    params = inspect.signature(module.forward).parameters
    return next((name for name in _CACHE_KWARGS if name in params), None)


def _cache_rows(num_virtual_tokens: int, input_ids, inputs_embeds) -> int:
    """P + T: the rows a prefix cache needs for one forward (the fused cache preallocates exactly these)."""
    tokens = input_ids if input_ids is not None else inputs_embeds
    return num_virtual_tokens + (tokens.shape[1] if tokens is not None and tokens.dim() >= 2 else 0)


def _batch_size(input_ids, inputs_embeds) -> int:
    if input_ids is None and inputs_embeds is None:
        raise ValueError("You have to provide either input_ids or inputs_embeds")
    return input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]


def _prefixed_mask(mask: torch.Tensor | None, batch_size: int, num_tokens: int) -> torch.Tensor | None:
    """cat(ones(B, P), mask) — float ones as in PEFT, so the result is float for an integer mask."""
    if mask is None:
        return None
    return torch.cat((torch.ones(batch_size, num_tokens).to(mask.device), mask), dim=1)


def _adjust_position_and_token_type_ids(config, kwargs: dict, drop_token_type_ids: bool) -> None:
    """Prefix tuning: positions shift by P (the prefix occupies 0..P-1); prompt methods cannot honour them."""
    if kwargs.get("position_ids") is not None:
        if config.peft_type == PeftType.PREFIX_TUNING:
            kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
        else:
            warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
            kwargs["position_ids"] = None
    if drop_token_type_ids and kwargs.get("token_type_ids") is not None:
        warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
        kwargs["token_type_ids"] = None


def _bind(task: TaskType | None, args: tuple, kwargs: dict) -> dict:
    if not args:
        return dict(kwargs)
    names = _FORWARD_PARAMS.get(task, _FORWARD_PARAMS[TaskType.CAUSAL_LM])
    if len(args) > len(names):
        raise TypeError(f"forward() takes at most {len(names)} positional arguments ({len(args)} given)")
    bound = dict(zip(names, args))
    duplicated = sorted(set(bound) & set(kwargs))
    if duplicated:
        raise TypeError(f"forward() got multiple values for argument(s) {duplicated}")
    bound.update(kwargs)
    return bound


def _base_forward(peft_model, kwargs: dict):
    """The base model alone (adapters disabled): PEFT-only arguments and unset (None) arguments are dropped."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "task_ids"}
    return peft_model.base_model(**kwargs)


def forward(peft_model, *args: Any, **kwargs: Any):
    """Forward of the active prompt-learning adapter for the PeftModel's task (docs/PEFT_CONTRACT.md §8.4)."""
    task = _task_of(peft_model)
    kwargs = _bind(task, args, kwargs)
    if peft_model._adapters_disabled:
        return _base_forward(peft_model, kwargs)
    if task is None:
        # A plain PeftModel (task_type None, e.g. from from_pretrained) has no prompt semantics: PEFT runs the
        # base model as is.
        warnings.warn("A prompt-learning adapter without a task_type is not applied; running the base model.")
        return _base_forward(peft_model, kwargs)
    config = peft_model.active_peft_config
    kwargs.pop("task_ids", None)
    if task == TaskType.SEQ_2_SEQ_LM:
        return _seq2seq_forward(peft_model, config, kwargs)
    if task in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS, TaskType.QUESTION_ANS):
        return _head_forward(peft_model, config, task, kwargs)
    return _decoder_forward(peft_model, config, task, kwargs)


def _embed(peft_model, input_ids, inputs_embeds):
    return peft_model.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds


def _prepend_prompts(peft_model, inputs_embeds: torch.Tensor, num_rows: int | None = None) -> torch.Tensor:
    """cat(prompts[:, :num_rows], inputs_embeds) along the sequence, prompts cast to the embeddings' dtype."""
    prompts = _unbatched_prompts(peft_model, peft_model.active_adapter)
    if num_rows is not None:
        prompts = prompts[:num_rows]
    prompts = prompts.to(inputs_embeds.dtype).unsqueeze(0).expand(inputs_embeds.shape[0], -1, -1)
    return torch.cat((prompts, inputs_embeds), dim=1)


def _decoder_forward(peft_model, config, task, kwargs: dict):
    """CAUSAL_LM and FEATURE_EXTRACTION."""
    base = peft_model.base_model
    input_ids, inputs_embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    batch_size = _batch_size(input_ids, inputs_embeds)
    nvt = config.num_virtual_tokens
    kwargs["attention_mask"] = _prefixed_mask(kwargs.get("attention_mask"), batch_size, nvt)
    _adjust_position_and_token_type_ids(config, kwargs, drop_token_type_ids=True)
    if config.peft_type == PeftType.PREFIX_TUNING:
        rows = _cache_rows(nvt, input_ids, inputs_embeds)
        kwargs[cache_kwarg_name(base) or "past_key_values"] = get_prompt(peft_model, batch_size, max_cache_len=rows)
        return base(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
    inputs_embeds = _embed(peft_model, input_ids, inputs_embeds)
    labels = kwargs.get("labels")
    if task == TaskType.CAUSAL_LM and labels is not None:
        # Virtual positions predict nothing: their labels are the ignore index.
        kwargs["labels"] = torch.cat((torch.full((batch_size, nvt), -100).to(labels.device), labels), dim=1)
    return base(inputs_embeds=_prepend_prompts(peft_model, inputs_embeds), **kwargs)


def _seq2seq_forward(peft_model, config, kwargs: dict):
    """SEQ_2_SEQ_LM: prefix → decoder self-attention cache; prompt/P-tuning → encoder inputs (first P rows)."""
    base = peft_model.base_model
    input_ids, inputs_embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    batch_size = _batch_size(input_ids, inputs_embeds)
    nvt = config.num_virtual_tokens
    is_prefix = config.peft_type == PeftType.PREFIX_TUNING
    if is_prefix:
        kwargs["decoder_attention_mask"] = _prefixed_mask(kwargs.get("decoder_attention_mask"), batch_size, nvt)
    _adjust_position_and_token_type_ids(config, kwargs, drop_token_type_ids=True)
    if is_prefix:
        kwargs[cache_kwarg_name(base) or "past_key_values"] = get_prompt(peft_model, batch_size)
        return base(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
    inputs_embeds = _embed(peft_model, input_ids, inputs_embeds)
    kwargs["attention_mask"] = _prefixed_mask(kwargs.get("attention_mask"), batch_size, nvt)
    # Only the first P of the N = 2P encoder rows reach the model (the rest exist for checkpoint compatibility).
    return base(inputs_embeds=_prepend_prompts(peft_model, inputs_embeds, nvt), **kwargs)


def _head_forward(peft_model, config, task, kwargs: dict):
    """SEQ_CLS / TOKEN_CLS / QUESTION_ANS."""
    base = peft_model.base_model
    input_ids, inputs_embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    if kwargs.get("return_dict") is None:
        kwargs["return_dict"] = getattr(base.config, "return_dict", True) and not getattr(
            base.config, "torchscript", False
        )
    batch_size = _batch_size(input_ids, inputs_embeds)
    nvt = config.num_virtual_tokens
    kwargs["attention_mask"] = _prefixed_mask(kwargs.get("attention_mask"), batch_size, nvt)
    _adjust_position_and_token_type_ids(config, kwargs, drop_token_type_ids=False)
    if config.peft_type == PeftType.PREFIX_TUNING:
        rows = _cache_rows(nvt, input_ids, inputs_embeds)
        return _head_prefix_forward(peft_model, batch_size, rows, input_ids, inputs_embeds, kwargs)
    if kwargs.get("token_type_ids") is not None:
        # Virtual tokens belong to segment 0.
        kwargs["token_type_ids"] = torch.cat(
            (torch.zeros(batch_size, nvt).to(kwargs["token_type_ids"].device), kwargs["token_type_ids"]), dim=1
        ).long()
    inputs_embeds = _embed(peft_model, input_ids, inputs_embeds)
    return base(inputs_embeds=_prepend_prompts(peft_model, inputs_embeds), **kwargs)


def _head_prefix_forward(peft_model, batch_size, rows, input_ids, inputs_embeds, kwargs: dict):
    """Prefix tuning under a task head.

    If the head model's forward declares the cache keyword, the cache is passed to it (PEFT's first branch).
    Otherwise (BERT, RoBERTa, … whose heads forward ``**kwargs``), the cache is handed to the backbone's call
    by a forward pre-hook, so the head model's own code computes pooling, dropout, head and loss; PEFT rebuilds
    that part by hand (pooled output → dropout → head), which equals the model's code for BERT-style heads and
    breaks for others (RoBERTa's classification head reads token 0 of the sequence output).
    """
    base = peft_model.base_model
    cache = get_prompt(peft_model, batch_size, max_cache_len=rows)
    name = cache_kwarg_name(base)
    if name is not None:
        return base(input_ids=input_ids, inputs_embeds=inputs_embeds, **{name: cache}, **kwargs)
    backbone = base.get_submodule(peft_model.transformer_backbone_name)
    name = cache_kwarg_name(backbone) if backbone is not base else None
    if name is None:
        raise ValueError("Model does not support past key values which are required for prefix tuning.")

    def inject_cache(module, args, module_kwargs):
        module_kwargs[name] = cache
        return args, module_kwargs

    handle = backbone.register_forward_pre_hook(inject_cache, with_kwargs=True)
    try:
        return base(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
    finally:
        handle.remove()


# ---------------------------------------------------------------------------- disable
@contextmanager
def disable_adapter(peft_model):
    """Inside the block forward/generate are the base model's, modules_to_save included; nesting-safe."""
    was_disabled = peft_model._adapters_disabled
    wrappers = _wrappers(peft_model)
    # The wrappers' own enable_adapters() would also rewrite requires_grad; only the routing flag must change.
    previous = [wrapper._disable_adapters for wrapper in wrappers]
    peft_model._adapters_disabled_flag = True
    for wrapper in wrappers:
        wrapper._disable_adapters = True
    try:
        yield
    finally:
        peft_model._adapters_disabled_flag = was_disabled
        for wrapper, state in zip(wrappers, previous):
            wrapper._disable_adapters = state
