"""Weight bytes of a Llama-style model before and after ``peft_kernels.quantize_int8`` (bf16 → int8 + row scales).

    python benchmarks/int8_weight_bytes.py

Counts parameter and buffer bytes of the transformer linears (q/k/v/o/gate/up/down) and of the whole model.
"""

import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peft_kernels as pk

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tensor_bytes(modules) -> int:
    return sum(
        t.numel() * t.element_size()
        for module in modules
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    )


def main():
    warnings.simplefilter("ignore")
    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    linears = lambda: [m for n, m in model.named_modules() if n.split(".")[-1] in LINEARS]
    before_linear, before_total = tensor_bytes(linears()), tensor_bytes(model.modules())
    pk.quantize_int8(model)
    after_linear, after_total = tensor_bytes(linears()), tensor_bytes(model.modules())
    print(
        f"transformer linears: bf16 {before_linear / 1e6:.2f} MB -> int8 {after_linear / 1e6:.2f} MB "
        f"({after_linear / before_linear:.3f}x); whole model {before_total / 1e6:.1f} -> {after_total / 1e6:.1f} MB"
    )


if __name__ == "__main__":
    main()
