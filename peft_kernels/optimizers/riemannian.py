"""Riemannian-preconditioned LoRA (https://huggingface.co/papers/2402.02347).

Before every step of the wrapped optimizer, for each trainable 2-d (lora_A, lora_B) pair (A (r, in), B (out, r)):

    g_A ← (BᵀB + reg·I_r)⁺ g_A          g_B ← g_B (A Aᵀ + reg·I_r)⁺

computed in fp32 (or A's dtype when wider). Embedding LoRA (raw Parameters) and every other parameter are
updated by the wrapped optimizer unchanged.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import nn
from torch.optim import Optimizer


def _lora_pairs(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    params = dict(model.named_parameters())
    pairs = []
    for name, param_a in params.items():
        if ".lora_A." not in name:
            continue
        param_b = params.get(name.replace(".lora_A.", ".lora_B."))
        if param_b is None or param_a.ndim != 2 or param_b.ndim != 2:
            continue
        if param_a.requires_grad and param_b.requires_grad:
            pairs.append((param_a, param_b))
    return pairs


def _damped_pinv(gram: torch.Tensor, reg: float) -> torch.Tensor:
    return torch.linalg.pinv(gram + reg * torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype))


@torch.no_grad()
def _precondition(pairs, reg: float) -> None:
    for param_a, param_b in pairs:
        grad_a, grad_b = param_a.grad, param_b.grad
        if grad_a is None and grad_b is None:
            continue
        dtype = torch.promote_types(param_a.dtype, torch.float32)
        a, b = param_a.detach().to(dtype), param_b.detach().to(dtype)
        if grad_a is not None:
            grad_a.copy_((_damped_pinv(b.T @ b, reg) @ grad_a.to(dtype)).to(grad_a.dtype))
        if grad_b is not None:
            grad_b.copy_((grad_b.to(dtype) @ _damped_pinv(a @ a.T, reg)).to(grad_b.dtype))


def create_riemannian_optimizer(
    model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float, reg: float = 1e-2, **kwargs
) -> Optimizer:
    """An ``optimizer_cls`` (subclass instance) over the trainable parameters that preconditions LoRA gradients."""
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise TypeError(f"optimizer_cls must be a subclass of torch.optim.Optimizer, got {optimizer_cls!r}.")
    pairs = _lora_pairs(model)
    if not pairs:
        raise ValueError(
            "create_riemannian_optimizer did not find any trainable lora_A/lora_B parameter pairs on the model. "
            "The Riemannian preconditioner only applies to LoRA-style adapters."
        )
    closure = inspect.signature(optimizer_cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"{optimizer_cls.__name__} requires a closure and re-evaluates the objective inside step(); the "
            "Riemannian preconditioner would be recomputed each iteration, invalidating the optimizer's curvature "
            "or line-search state. Use an optimizer whose step() has an optional closure (SGD, AdamW, etc)."
        )

    class RiemannianPreconditionedOptimizer(optimizer_cls):
        @torch.no_grad()
        def step(self, closure: Optional[Callable] = None):
            if closure is not None:
                raise ValueError(
                    "The Riemannian-preconditioned optimizer does not support closures. Closures re-evaluate the "
                    "objective inside step(), which would overwrite the preconditioned gradients before the base "
                    "optimizer consumes them."
                )
            _precondition(pairs, reg)
            return super().step()

    return RiemannianPreconditionedOptimizer([p for p in model.parameters() if p.requires_grad], lr=lr, **kwargs)
