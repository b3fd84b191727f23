"""LoRA-FA (https://huggingface.co/papers/2308.03303): A frozen, B trained by AdamW on a projected gradient.

For each adapter's (A (r, in), B (out, r)) pair with scaling s, B's gradient is replaced by

    g̃_B = (1/s²) · g_B · (A Aᵀ + 1e-8·I_r)⁺

(computed under bf16 autocast where bf16 is available, as PEFT does), then B takes a Hugging Face AdamW step
(``correct_bias``; decoupled decay ``p -= lr·wd·p`` after the update). Every other trainable parameter takes the
same AdamW step on its own gradient. A pair is two consecutive ``lora`` parameters of the group (A, then B).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.optim import Optimizer


def _bf16_available(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


class LoraFAOptimizer(Optimizer):
    """AdamW (Hugging Face's variant) whose LoRA B gradients are projected as in the module docstring.

    Param groups carry ``names`` (one per parameter) and ``scaling_factors`` (the LoRA scaling of each ``lora``
    parameter's adapter); the legacy single ``scaling_factor`` is accepted with a FutureWarning.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
        for i in (0, 1):
            if not 0.0 <= betas[i] < 1.0:
                raise ValueError(f"Invalid beta parameter: {betas[i]} - should be in [0.0, 1.0)")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps} - should be >= 0.0")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults)
        self._legacy_scaling_factor_warned = False

    def _scaling_factors(self, group) -> list:
        if "scaling_factors" in group:
            return group["scaling_factors"]
        if "scaling_factor" in group:
            if not self._legacy_scaling_factor_warned:
                warnings.warn(
                    "`scaling_factor` is deprecated and will be removed after 2026-11-01. "
                    "Please use `scaling_factors` instead.",
                    FutureWarning,
                )
                self._legacy_scaling_factor_warned = True
            return [group["scaling_factor"]] * len(group["params"])
        raise KeyError("Expected optimizer param group to define `scaling_factors`.")

    @staticmethod
    def _adamw_update(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, key: str = "") -> None:
        """m ← β1 m + (1-β1) g; v ← β2 v + (1-β2) g²; p -= lr_t · m / (√v + ε); p -= lr · wd · p.

        m, v are ``state["exp_avg" + key]``, ``state["exp_avg_sq" + key]``: PEFT's names ("_B" for a LoRA pair's B),
        so an optimizer state dict moves between the two libraries."""
        beta1, beta2 = group["betas"]
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg" + key], state["exp_avg_sq" + key]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        param.addcdiv_(exp_avg, denom, value=-step_size)
        if group["weight_decay"] > 0.0:
            param.add_(param, alpha=-group["lr"] * group["weight_decay"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            pending_a = None  # a lora parameter waiting for its partner
            for param, name, scaling in zip(group["params"], group["names"], self._scaling_factors(group)):
                if "lora" not in name:
                    if param.grad is None:
                        continue
                    state = self.state[name]
                    if not state:
                        state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
                    self._adamw_update(param, param.grad, state, group)
                    continue
                if pending_a is None:
                    pending_a = param
                    continue
                lora_a, lora_b, pending_a = pending_a, param, None
                state = self.state[name[: name.find("lora")] + "lora"]
                if not state:
                    state.update(step=0, exp_avg_B=torch.zeros_like(lora_b), exp_avg_sq_B=torch.zeros_like(lora_b))
                gram = lora_a @ lora_a.T
                gram_pinv = torch.linalg.pinv(gram + 1e-8 * torch.eye(lora_a.shape[0]).to(lora_a.device))
                device_type = lora_b.grad.device.type
                with torch.autocast(
                    device_type=device_type, dtype=torch.bfloat16, enabled=_bf16_available(device_type)
                ):
                    grad_b = (1 / scaling**2) * (lora_b.grad @ gram_pinv)
                self._adamw_update(lora_b, grad_b.to(lora_b.grad.dtype), state, group, key="_B")
        return loss


def create_lorafa_optimizer(
    model: nn.Module,
    r: int,
    lora_alpha: int,
    lr: float,
    weight_decay: float = 0.0,
    use_rslora: Optional[bool] = None,
) -> Optimizer:
    """Freezes every lora_A, then a LoraFAOptimizer over all parameters with each adapter's own scaling."""
    active = [a for a in model.active_adapters if a in model.peft_config]
    adapter_rslora = {a: bool(getattr(model.peft_config[a], "use_rslora", False)) for a in active}
    if use_rslora is not None:
        mismatched = [a for a, rs in adapter_rslora.items() if rs != use_rslora]
        if mismatched:
            raise ValueError(
                f"`use_rslora={use_rslora}` was passed to create_lorafa_optimizer, but the following active adapters "
                f"have `use_rslora` set differently in the model config: {mismatched}. Please configure rsLoRA via "
                "LoraConfig and remove the `use_rslora` argument from create_lorafa_optimizer as the parameter is "
                "deprecated."
            )
        warnings.warn(
            "`use_rslora` in create_lorafa_optimizer is deprecated and will be removed after 2026-11-01. "
            "Please configure rsLoRA via LoraConfig instead.",
            FutureWarning,
        )
        rslora = use_rslora
    else:
        rslora = all(adapter_rslora.values()) if adapter_rslora else False
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)
    legacy_scaling = lora_alpha / math.sqrt(r) if rslora else lora_alpha / r

    def scaling_of(name: str):
        if ".lora_" not in name:
            return None
        module_name, _, suffix = name.rpartition(".lora_")
        parts = suffix.split(".")
        if len(parts) < 2:
            return None
        module = model.get_submodule(module_name)
        scaling = getattr(module, "scaling", None)
        return scaling.get(parts[1]) if isinstance(scaling, dict) else None

    named = list(model.named_parameters())
    group = {
        "params": [p for _, p in named],
        "lr": lr,
        "names": [n for n, _ in named],
        "scaling_factors": [scaling_of(n) for n, _ in named],
        "scaling_factor": legacy_scaling,  # PEFT keeps the legacy key in the group too
        "betas": (0.9, 0.999),
        "weight_decay": weight_decay,
    }
    return LoraFAOptimizer([group])
