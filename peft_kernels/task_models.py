"""The task classes: PeftModel for each TaskType, with the forward signature of the matching transformers head.

``peft_kernels.peft_model.PeftModelForCausalLM`` (PEFT 0.21.2's path) and ``peft_kernels.PeftModelForCausalLM``
name the same classes. Each carries its ``TaskType`` as ``_task_type`` (prompt learning reads it) and is
registered in ``mapping.MODEL_TYPE_TO_PEFT_MODEL_MAPPING`` when this module is imported.
"""

from __future__ import annotations

from .mapping import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from .peft_model import PeftModel
from .tuners.tuners_utils import set_trainable_modules
from .utils.constants import QA_HEAD_NAMES, SEQ_CLS_HEAD_NAMES
from .utils.peft_types import TaskType

__all__ = [
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
]


class PeftModelForCausalLM(PeftModel):
    _task_type = TaskType.CAUSAL_LM

    def __init__(self, model, peft_config, adapter_name="default", **kwargs):
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self.base_model_prepare_inputs_for_generation = getattr(self.base_model, "prepare_inputs_for_generation", None)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        task_ids=None,
        **kwargs,
    ):
        return self._named_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            task_ids=task_ids,
            **kwargs,
        )


class PeftModelForSeq2SeqLM(PeftModel):
    _task_type = TaskType.SEQ_2_SEQ_LM

    def __init__(self, model, peft_config, adapter_name="default", **kwargs):
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self.base_model_prepare_inputs_for_generation = getattr(self.base_model, "prepare_inputs_for_generation", None)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        decoder_inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        task_ids=None,
        **kwargs,
    ):
        return self._named_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            task_ids=task_ids,
            **kwargs,
        )

    def generate(self, **kwargs):
        # Keyword-only, as PEFT's: positional input_ids raise TypeError for seq2seq models.
        return super().generate(**kwargs)


def _extend_modules_to_save(peft_config, names) -> None:
    if peft_config.modules_to_save is None:
        peft_config.modules_to_save = list(names)
    else:
        peft_config.modules_to_save.extend(names)


class _HeadTrainingModel(PeftModel):
    """SEQ_CLS / TOKEN_CLS / QA: the task head trains in full (modules_to_save extended as PEFT does).

    PEFT extends ``modules_to_save`` in ``__init__`` (SEQ_CLS before building the model, TOKEN_CLS/QA after)
    and again in every ``add_adapter``; prompt-learning models call ``add_adapter`` from ``__init__``, so
    their configs carry the head names twice. Reproduced on purpose: the JSON files must match.
    """

    head_names: list[str] = []
    extend_before_init = True

    def __init__(self, model, peft_config, adapter_name="default", **kwargs):
        if self.extend_before_init:
            _extend_modules_to_save(peft_config, self.head_names)
        super().__init__(model, peft_config, adapter_name, **kwargs)
        if not self.extend_before_init:
            _extend_modules_to_save(peft_config, self.head_names)
            set_trainable_modules(
                self.get_base_model(), adapter_name, peft_config.modules_to_save, peft_config.inference_mode
            )
        self.cls_layer_name = next(
            (name for name, _ in self.get_base_model().named_children() if name in self.head_names), None
        )

    def add_adapter(self, adapter_name, peft_config, low_cpu_mem_usage=False, autocast_adapter_dtype=True):
        _extend_modules_to_save(peft_config, self.head_names)
        super().add_adapter(adapter_name, peft_config, low_cpu_mem_usage, autocast_adapter_dtype)


class PeftModelForSequenceClassification(_HeadTrainingModel):
    _task_type = TaskType.SEQ_CLS
    head_names = SEQ_CLS_HEAD_NAMES


class PeftModelForTokenClassification(_HeadTrainingModel):
    _task_type = TaskType.TOKEN_CLS
    head_names = SEQ_CLS_HEAD_NAMES
    extend_before_init = False


class PeftModelForQuestionAnswering(_HeadTrainingModel):
    _task_type = TaskType.QUESTION_ANS
    head_names = QA_HEAD_NAMES
    extend_before_init = False


class PeftModelForFeatureExtraction(PeftModel):
    _task_type = TaskType.FEATURE_EXTRACTION

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        task_ids=None,
        **kwargs,
    ):
        return self._named_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            task_ids=task_ids,
            **kwargs,
        )


for _task_class in (
    PeftModelForSequenceClassification,
    PeftModelForSeq2SeqLM,
    PeftModelForCausalLM,
    PeftModelForTokenClassification,
    PeftModelForQuestionAnswering,
    PeftModelForFeatureExtraction,
):
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING[_task_class._task_type] = _task_class
del _task_class
