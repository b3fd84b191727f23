"""AutoPeftModel*: load the base model named in adapter_config.json, then the adapter."""

from __future__ import annotations

import importlib
from typing import Optional

from .config import PeftConfig
from .mapping import MODEL_TYPE_TO_PEFT_MODEL_MAPPING  # noqa: F401  (PEFT's path: peft.auto)
from .peft_model import PeftModel
from .task_models import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)


class _BaseAutoPeftModel:
    _target_class: Optional[str] = None  # name of the transformers Auto class
    _target_peft_class = PeftModel

    def __init__(self, *args, **kwargs):
        raise OSError(f"{self.__class__.__name__} is designed to be instantiated using `from_pretrained`.")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        revision: Optional[str] = None,
        **kwargs,
    ):
        import transformers

        peft_config = PeftConfig.from_pretrained(pretrained_model_name_or_path, revision=revision, **kwargs)
        base_model_path = peft_config.base_model_name_or_path
        if base_model_path is None:
            raise ValueError(
                f"The adapter at {pretrained_model_name_or_path!r} has no base_model_name_or_path; load the base "
                "model yourself and use PeftModel.from_pretrained(model, path)."
            )
        base_revision = peft_config.revision
        if cls._target_class is not None:
            auto_cls = getattr(transformers, cls._target_class)
        elif peft_config.auto_mapping is not None:
            module = importlib.import_module(peft_config.auto_mapping["parent_library"])
            auto_cls = getattr(module, peft_config.auto_mapping["base_model_class"])
        else:
            raise ValueError(
                "Cannot infer the auto class from the config, please make sure that you are loading "
                "the correct model for your task type."
            )
        hub_keys = (
            "cache_dir",
            "token",
            "local_files_only",
            "torch_dtype",
            "dtype",
            "device_map",
            "quantization_config",
            "trust_remote_code",
            "low_cpu_mem_usage",
        )
        model_kwargs = {k: v for k, v in kwargs.items() if k in hub_keys}
        base_model = auto_cls.from_pretrained(base_model_path, revision=base_revision, **model_kwargs)
        return cls._target_peft_class.from_pretrained(
            base_model,
            pretrained_model_name_or_path,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            config=config,
        )


class AutoPeftModel(_BaseAutoPeftModel):
    _target_class = None
    _target_peft_class = PeftModel


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _target_class = "AutoModelForCausalLM"
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _target_class = "AutoModelForSeq2SeqLM"
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _target_class = "AutoModelForSequenceClassification"
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _target_class = "AutoModelForTokenClassification"
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _target_class = "AutoModelForQuestionAnswering"
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _target_class = "AutoModel"
    _target_peft_class = PeftModelForFeatureExtraction
