"""LoRA over ``nn.MultiheadAttention`` (PEFT's ``lora.MultiheadAttention``, used by CLIP-style models).

``nn.MultiheadAttention`` reads ``in_proj_weight`` (3E, E) and ``out_proj.weight`` (E, E) directly inside
``F.multi_head_attention_forward``; neither goes through a module forward that a LoRA layer could wrap. So, as
PEFT, the adapter lives on both projections and is folded into the weights for the call:

    W_in'  = W_in  + Σ_a s_a · B_a A_a                    lora_A[a]: (r, E),  lora_B[a]: (3E, r)
    W_out' = W_out + 2 · Σ_a s_a · B'_a A'_a              on ``base_layer.out_proj`` (a ``lora.Linear``)
    y = MultiheadAttention(query, key, value; W_in', W_out')

The factor 2 on the out projection is PEFT 0.21.2's: its ``MultiheadAttention.merge`` adds out_proj's ΔW and
then calls the wrapped ``lora.Linear.merge``, which adds it again through ``.data`` (so the gradient sees one
ΔW), and ``unmerge`` removes both. Adapters trained with PEFT learned B', A' under that factor, so it is kept:
the same checkpoint gives the same outputs and the same gradients.

Unlike PEFT, the forward does not delete the Parameters and set them back: for the call, W_in' and W_out' shadow
``in_proj_weight`` and ``out_proj``'s ``weight`` as instance attributes (an instance attribute is found before
``nn.Module``'s parameter lookup), and the previous instance attributes come back afterwards, so the Parameters,
their order and the state dict stay untouched. Shadowing, not ``torch.func.functional_call``: FSDP with
``use_orig_params=True`` itself sets the unsharded weights as instance attributes during its forward, which
``functional_call``'s substitution (in ``_parameters``) does not override; PEFT's swap and ours do.
Only ``query, key, value`` batches of the packed (``_qkv_same_embed_dim``) layout are supported, as PEFT.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

from ._base import check_adapters_to_merge
from .lora import Linear, LoraLayer

_ABSENT = object()


@contextmanager
def _shadowed(module: nn.Module, name: str, tensor: torch.Tensor):
    """``module.<name>`` reads ``tensor`` inside the block; whatever instance attribute was there comes back."""
    previous = module.__dict__.get(name, _ABSENT)
    module.__dict__[name] = tensor
    try:
        yield
    finally:
        if previous is _ABSENT:
            del module.__dict__[name]
        else:
            module.__dict__[name] = previous


# PEFT adds out_proj's ΔW twice (see the module docstring).
OUT_PROJ_DELTA_FACTOR = 2


class MultiheadAttention(nn.Module, LoraLayer):
    """LoRA on ``in_proj_weight`` (here) and ``out_proj`` (a ``lora.Linear`` inside the base layer)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        init_lora_weights: Union[bool, str] = True,
        use_rslora: bool = False,
        lora_bias: bool = False,
        inference_mode: bool = False,
        **kwargs,
    ) -> None:
        if not getattr(base_layer, "_qkv_same_embed_dim", True):
            raise ValueError(
                f"Only same embed for query/key/value is supported as of now for {self.__class__.__name__}."
            )
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError(f"out_proj must be an instance of nn.Linear for {self.__class__.__name__}.")
        self.fan_in_fan_out = False
        layer_kwargs = dict(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            init_lora_weights=init_lora_weights,
            use_rslora=use_rslora,
            lora_bias=lora_bias,
            inference_mode=inference_mode,
        )
        self.base_layer.out_proj = Linear(base_layer.out_proj, adapter_name, **layer_kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **layer_kwargs)

    # nn.MultiheadAttention's attributes, read through (code that inspects the layer keeps working).
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.get_base_layer(), name)

    @property
    def out_proj(self) -> nn.Module:
        return self.get_base_layer().out_proj.get_base_layer()

    def update_layer(self, adapter_name: str, r: int, *args, **kwargs) -> None:
        """Adds the adapter to in_proj (here) and to out_proj; PEFT offers no way to adapt only one of them."""
        super().update_layer(adapter_name, r, *args, **kwargs)
        self.base_layer.out_proj.update_layer(adapter_name, r, *args, **kwargs)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW_in = s · B A: (3E, E); fp32 for 16-bit weights on CPU."""
        weight_a = self.lora_A[adapter].weight
        weight_b = self.lora_B[adapter].weight
        dtype = weight_b.dtype
        cast_to_fp32 = weight_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if cast_to_fp32:
            weight_a, weight_b = weight_a.float(), weight_b.float()
        delta = (weight_b @ weight_a) * self.scaling[adapter]
        return delta.to(dtype) if cast_to_fp32 else delta

    def _adapted_weights(self, adapters: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_in', W_out') for ``adapters``, differentiable in the adapter weights."""
        base = self.get_base_layer()
        out_proj = base.out_proj
        w_in, w_out = base.in_proj_weight, out_proj.get_base_layer().weight
        for adapter in adapters:
            w_in = w_in + self.get_delta_weight(adapter).to(w_in.dtype)
            delta_out = out_proj.get_delta_weight(adapter).to(w_out.dtype)
            # Value W + 2·ΔW, gradient of W + ΔW: PEFT's second addition goes through .data (see module docstring).
            w_out = w_out + delta_out + (OUT_PROJ_DELTA_FACTOR - 1) * delta_out.detach()
        return w_in, w_out

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W_in += ΔW_in, W_out += 2·ΔW_out per adapter; out_proj records the merge as well (PEFT's state)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        out_proj = base.out_proj
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            with torch.no_grad():
                w_in, w_out = self._adapted_weights([adapter])
            if safe_merge and not (torch.isfinite(w_in).all() and torch.isfinite(w_out).all()):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            base.in_proj_weight.data = w_in
            out_proj.get_base_layer().weight.data = w_out
            out_proj.merged_adapters.append(adapter)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        out_proj = base.out_proj
        out_weight = out_proj.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            with torch.no_grad():
                base.in_proj_weight.data -= self.get_delta_weight(adapter).to(base.in_proj_weight.dtype)
                out_weight.data -= OUT_PROJ_DELTA_FACTOR * out_proj.get_delta_weight(adapter).to(out_weight.dtype)
            if adapter in out_proj.merged_adapters:
                out_proj.merged_adapters.remove(adapter)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.MultiheadAttention:
        """The plain ``nn.MultiheadAttention`` back (its out_proj unwrapped), merged first when asked."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        base = self.get_base_layer()
        base.out_proj = base.out_proj.get_base_layer()
        return base

    def _check_forward_args(self, x, *args, **kwargs) -> None:
        if "adapter_names" in kwargs:
            raise TypeError(f"lora.{self.__class__.__name__} does not support mixed adapter batches.")
        super()._check_forward_args(x, *args, **kwargs)

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any):
        previous_dtype = query.dtype
        self._check_forward_args(query, *args, **kwargs)
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = base(query, *args, **kwargs)
        elif self.merged:
            result = base(query, *args, **kwargs)
        else:
            out_proj = base.out_proj
            if out_proj.active_adapters != self.active_adapters:
                cls_name = type(base).__name__
                raise ValueError(
                    f"The out_proj layer of {cls_name} has merged layers but {cls_name} itself doesn't; please ensure "
                    "that either both or none have merged layers"
                )
            active = [a for a in self.active_adapters if a in self.lora_A]
            w_in, w_out = self._adapted_weights(active)
            with _shadowed(base, "in_proj_weight", w_in), _shadowed(out_proj.get_base_layer(), "weight", w_out):
                result = base(query, *args, **kwargs)
        attn_weights = result[1].to(previous_dtype) if result[1] is not None else None
        return result[0].to(previous_dtype), attn_weights

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
