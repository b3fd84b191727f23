"""LoRA+ (https://huggingface.co/papers/2402.12354): B trains with a learning rate ``loraplus_lr_ratio`` times A's.

Parameter groups, in PEFT's order (each trainable parameter in exactly one):

    A          every other trainable parameter (lora_A, …)     lr                      weight_decay = wd
    embedding  parameters of a lora.Embedding layer             loraplus_lr_embedding   wd
    B          lora_B and 1-d parameters outside LayerNorms     lr · ratio              wd
    B_no_decay lora_B and 1-d parameters: biases, LayerNorms    lr · ratio              0

with wd = ``loraplus_weight_decay`` (default 0) and ``loraplus_lr_embedding`` default 1e-6.
"""

from __future__ import annotations

from operator import attrgetter

from torch import nn
from torch.optim import Optimizer

from ..layers.lora import Embedding

_BNB_8BIT_OPTIMIZERS = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def _decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that take weight decay: not inside a LayerNorm, not a bias (transformers' rule)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            continue
        prefix = f"{module_name}." if module_name else ""
        names.update(f"{prefix}{p}" for p in module._parameters if "bias" not in f"{prefix}{p}")
    # A parameter under a LayerNorm anywhere up its path is excluded, as transformers' recursive walk does.
    norm_prefixes = [f"{n}." for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    return {n for n in names if not any(n.startswith(p) for p in norm_prefixes)}


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float, loraplus_lr_ratio: float, **kwargs
) -> Optimizer:
    """``optimizer_cls`` over the four LoRA+ groups above; other ``kwargs`` go to the optimizer."""
    decay = _decay_parameter_names(model)
    groups = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module_name = ".".join(name.split(".")[:-2])
        module = attrgetter(module_name)(model) if module_name else None
        if isinstance(module, Embedding):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decay else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    kwargs["lr"] = lr
    optimizer = optimizer_cls(
        [
            {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
            {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
            {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
            {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
        ],
        **kwargs,
    )
    if optimizer_cls.__name__ in _BNB_8BIT_OPTIMIZERS:
        # 8-bit optimizer states are too coarse for embedding tables: keep those 32-bit (bitsandbytes' advice).
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
