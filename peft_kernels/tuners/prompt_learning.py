"""Prompt learning (prefix tuning, P-tuning, prompt tuning) inside PeftModel.

Not implemented yet: the encoders and forward paths arrive with the prompt-learning issue. Every entry point
raises NotImplementedError naming the method, so a prompt-learning config fails loudly and early.
"""

from __future__ import annotations

from contextlib import contextmanager


def _unsupported(peft_model, what: str):
    raise NotImplementedError(
        f"{what} for {peft_model.peft_type} is not implemented in peft_kernels yet; LoRA is."
    )


def add_adapter(peft_model, adapter_name, peft_config, low_cpu_mem_usage=False):
    _unsupported(peft_model, "Prompt learning")


def set_adapter(peft_model, adapter_name, inference_mode=False):
    _unsupported(peft_model, "set_adapter")


def delete_adapter(peft_model, adapter_name):
    _unsupported(peft_model, "delete_adapter")


def forward(peft_model, *args, **kwargs):
    _unsupported(peft_model, "forward")


def generate(peft_model, *args, **kwargs):
    _unsupported(peft_model, "generate")


@contextmanager
def disable_adapter(peft_model):
    _unsupported(peft_model, "disable_adapter")
    yield
