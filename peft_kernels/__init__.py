"""peft_kernels: Hugging Face PEFT 0.21's API (LoRA, int8 LoRA, prefix/P-/prompt tuning) over fused kernels.

``from peft import X`` → ``from peft_kernels import X``. Importing needs only torch; Triton, the CUDA
extension, bitsandbytes and peft are optional and loaded on first use (see ``peft-kernels info``).
"""

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PeftConfig, PeftConfigMixin, PromptLearningConfig
from .integration.trainer import ensure_trainer_support
from .layers.int8 import Int8Linear, quantize_int8
from .mapping import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    get_peft_config,
    inject_adapter_in_model,
)
from .mapping_func import get_peft_model
from .peft_model import PeftModel, get_layer_status, get_model_status
from .task_models import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .tuners import (
    LoftQConfig,
    LoraConfig,
    LoraModel,
    LoraRuntimeConfig,
    PrefixEncoder,
    PrefixTuningConfig,
    PromptEmbedding,
    PromptEncoder,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
)
from .tuners.tuners_utils import NoMatchingPeftModuleError, PeftError, PeftWarning
from .utils import (
    TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING,
    PeftType,
    TaskType,
    bloom_model_postprocess_past_key_value,
    cast_mixed_precision_params,
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    prepare_model_for_kbit_training,
    set_base_model_state_dict,
    set_peft_model_state_dict,
    shift_tokens_right,
)
from .utils.other import fsdp_auto_wrap_policy
from .version import __version__

# transformers' Trainer recognises PEFT models by class: register ours (adapter-only checkpoints). Patches now if
# transformers.trainer is imported, else right after it is (integration/trainer.py); never imports it.
ensure_trainer_support()


# Hugging Face peft interop (integration/hf_peft.py). Imported on call: `import peft_kernels` never imports peft.
def patch_peft_model(model):
    """Runs the LoRA layers of a Hugging Face ``peft`` model on peft_kernels' fused op, in place (same Parameters)."""
    from .integration.hf_peft import patch_peft_model as impl

    return impl(model)


def unpatch_peft_model(model):
    """Gives the layers patched by ``patch_peft_model`` their PEFT class back, in place."""
    from .integration.hf_peft import unpatch_peft_model as impl

    return impl(model)


def patch_peft() -> bool:
    """Every LoRA / prefix-tuning model Hugging Face ``peft`` builds from now on runs on peft_kernels (one line)."""
    from .integration.patch import patch_peft as impl

    return impl()


def unpatch_peft() -> None:
    """Undoes ``patch_peft()``: PEFT's original functions again (models already built keep their layers)."""
    from .integration.patch import unpatch_peft as impl

    impl()


def to_hf_peft(model, patch: bool = False):
    """A peft_kernels LoRA ``PeftModel`` as a ``peft.PeftModel`` over the same base model and Parameters."""
    from .integration.hf_peft import to_hf_peft as impl

    return impl(model, patch=patch)


def from_hf_peft(model):
    """A ``peft.PeftModel`` (LoRA) as a peft_kernels ``PeftModel`` over the same base model and Parameters."""
    from .integration.hf_peft import from_hf_peft as impl

    return impl(model)


__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "LoftQConfig",
    "LoraConfig",
    "LoraModel",
    "LoraRuntimeConfig",
    "NoMatchingPeftModuleError",
    "PeftConfig",
    "PeftConfigMixin",
    "PeftError",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "__version__",
    "bloom_model_postprocess_past_key_value",
    "cast_mixed_precision_params",
    "from_hf_peft",
    "fsdp_auto_wrap_policy",
    "get_base_model_state_dict",
    "get_layer_status",
    "quantize_int8",
    "Int8Linear",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_peft_weights",
    "patch_peft",
    "patch_peft_model",
    "prepare_model_for_kbit_training",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "shift_tokens_right",
    "to_hf_peft",
    "unpatch_peft",
    "unpatch_peft_model",
]
