"""The reference backend: pure PyTorch, importable everywhere, the specification of every op."""

from __future__ import annotations

# op name -> module under backends/reference/ that defines a function of the same name (and the capability check)
IMPLEMENTATIONS = {
    "lora_linear_fwd": "lora",
    "lora_linear_inference": "lora",
    "lora_linear_bwd": "lora",
    "lora_linear_mixed": "lora_mixed",
    "lora_linear_4bit_fwd": "lora_4bit",
    "lora_linear_4bit_bwd": "lora_4bit",
    "prefix_kv_fill": "prefix",
    "kv_append": "prefix",
    "prefix_kv_fill_bwd": "prefix",
}


def unavailable_reason() -> str | None:
    return None
