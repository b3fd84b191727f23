"""LoRA layers with PEFT's attribute names; the forward is one call into ``peft_kernels.ops``.

``Linear`` wraps ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight stored (in, out); flagged by
``fan_in_fan_out``). Its forward for the active adapters is ``ops.lora_linear_multi`` — base GEMM plus every
low-rank update in one op, dropout regenerated from a seed — whenever the base layer is a plain linear map;
anything else (hooks, subclasses, extra forward arguments) runs PEFT's eager formula. A mixed-adapter batch
(``adapter_names=``) is one ``ops.lora_linear_mixed`` call for Linear, grouped eager updates for the others.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ._base import BaseTunerLayer, check_adapters_to_merge, is_conv1d
from ._mixed import add_grouped_updates, linear_mixed_forward

_ABSENT = object()


def _parameter(module: nn.Module, name: str):
    """``getattr(module, name)`` for a parameter, without Module.__getattr__'s slow path (~2 µs per call on the CI
    box, several per layer per token): the instance dict first (a wrapper that shadows a parameter with a plain
    tensor, as FSDP's unsharded views do, puts it there), then ``_parameters``, then getattr for anything else."""
    value = module.__dict__.get(name, _ABSENT)
    if value is _ABSENT:
        value = module._parameters.get(name, _ABSENT)
    return getattr(module, name) if value is _ABSENT else value


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


def _low_rank_delta(weight_b: torch.Tensor, weight_a: torch.Tensor, scaling: float, transposed: bool) -> torch.Tensor:
    """ΔW = transpose(B·A, transposed)·s in B's dtype, computed in fp32 for 16-bit weights on CPU."""
    dtype = weight_b.dtype
    cast_to_fp32 = weight_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if cast_to_fp32:
        weight_a, weight_b = weight_a.float(), weight_b.float()
    delta = transpose(weight_b @ weight_a, transposed) * scaling
    return delta.to(dtype) if cast_to_fp32 else delta


class LoraLayer(BaseTunerLayer):
    """Per-adapter state of a LoRA layer, under PEFT's names (checkpoints and user code reach them)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "use_rslora", "lora_bias")
    _adapter_store = "lora_A"  # the dict whose keys are this layer type's adapters (Embedding: lora_embedding_A)

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r = {}
        self.lora_alpha = {}
        self.scaling = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self.lora_embedding_A = nn.ParameterDict({})
        self.lora_embedding_B = nn.ParameterDict({})
        self.lora_magnitude_vector = nn.ModuleDict()
        self.use_rslora = {}
        self.use_dora = {}
        self.lora_bias = {}
        self.lora_variant = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            in_features, out_features = base.in_features, base.out_features
        elif is_conv1d(base):
            in_features, out_features = base.weight.shape
        elif isinstance(base, nn.Embedding):
            in_features, out_features = base.num_embeddings, base.embedding_dim
        elif isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            in_features, out_features = base.in_channels, base.out_channels
        elif isinstance(base, nn.MultiheadAttention):  # in_proj packs q, k and v: (3·E, E)
            in_features, out_features = base.embed_dim, 3 * base.embed_dim
        elif hasattr(base, "in_features") and hasattr(base, "out_features"):
            in_features, out_features = base.in_features, base.out_features
        else:  # a custom layer type (LoraConfig._register_custom_module): its LoRA class sets what it needs
            in_features, out_features = None, None
        self.in_features = in_features
        self.out_features = out_features

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: Union[bool, str],
        use_rslora: bool = False,
        lora_bias: bool = False,
        inference_mode: bool = False,
    ) -> None:
        """Adds adapter ``adapter_name``: A (r, in), B (out, r), dropout, scaling = alpha/r (or alpha/√r)."""
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout should be in [0, 1), got {lora_dropout}")
        self._check_new_adapter(r, lora_bias)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self._create_adapter_weights(adapter_name, r, lora_bias)
        self.lora_bias[adapter_name] = lora_bias
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.use_rslora[adapter_name] = use_rslora
        self.use_dora[adapter_name] = False
        if init_lora_weights:
            self.reset_lora_parameters(adapter_name, init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _check_new_adapter(self, r: int, lora_bias: bool) -> None:
        """Hook: raise (or warn) for settings this layer type cannot take."""

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        """Hook: A (r, in) and B (out, r) as nn.Linear, PEFT's layout for linear bases."""
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: Union[bool, str]) -> None:
        """True: A ~ kaiming_uniform(a=√5), B = 0; "gaussian": A ~ N(0, 1/r), B = 0 (an exact no-op at init)."""
        if adapter_name in self.lora_A:
            if init_lora_weights is True:
                nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
            elif str(init_lora_weights).lower() == "gaussian":
                nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / self.r[adapter_name])
            else:
                raise ValueError(f"Unknown initialization init_lora_weights={init_lora_weights!r}")
            nn.init.zeros_(self.lora_B[adapter_name].weight)
            if self.lora_bias[adapter_name]:
                nn.init.zeros_(self.lora_B[adapter_name].bias)
        if adapter_name in self.lora_embedding_A:
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter not in self.scaling:
            return
        r = self.r[adapter]
        base = self.lora_alpha[adapter] / (math.sqrt(r) if self.use_rslora[adapter] else r)
        self.scaling[adapter] = scale * base

    def scale_layer(self, scale: float) -> None:
        if scale == 1:
            return
        for active_adapter in self.active_adapters:
            if active_adapter in self.lora_A or active_adapter in self.lora_embedding_A:
                self.scaling[active_adapter] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A and active_adapter not in self.lora_embedding_A:
                continue
            if scale is None:
                self.set_scale(active_adapter, 1.0)
            else:
                self.scaling[active_adapter] /= scale

    def _check_forward_args(self, x: torch.Tensor, *args, **kwargs) -> None:
        adapter_names = kwargs.get("adapter_names", None)
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def _eager_lora_update(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """PEFT's formula for one adapter: B(A(dropout(x))) · s, in the adapter dtype."""
        lora_a = self.lora_A[adapter]
        if self.cast_input_dtype_enabled:
            x = x.to(lora_a.weight.dtype)
        return self.lora_B[adapter](lora_a(self.lora_dropout[adapter](x))) * self.scaling[adapter]

    def _branch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """PEFT's branch order for every LoRA layer: disabled → mixed batch → merged / no active adapter → LoRA.

        The last branch is ``_lora_forward(x, active, args, kwargs)``: the fused op where it applies, else
        ``_eager_forward`` (PEFT's formula over the base layer's own forward).
        """
        adapter_names = None
        if kwargs:  # the checks read only keyword arguments (adapter_names)
            self._check_forward_args(x, *args, **kwargs)
            adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        store = self._modules[self._adapter_store]  # not getattr: Module.__getattr__ costs ~2 µs per call
        active = [a for a in self.active_adapters if a in store]
        if self.merged_adapters or not active:
            return self.base_layer(x, *args, **kwargs)
        return self._lora_forward(x, active, args, kwargs)

    def _lora_forward(self, x: torch.Tensor, active: list[str], args, kwargs) -> torch.Tensor:
        return self._eager_forward(x, active, args, kwargs)

    def _eager_forward(self, x: torch.Tensor, active: list[str], args, kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        torch_result_dtype = result.dtype
        for adapter in active:
            result = result + self._eager_lora_update(x, adapter)
        return result.to(torch_result_dtype)

    @staticmethod
    def _base_is_hooked(base_layer: nn.Module) -> bool:
        # accelerate's add_hook_to_module sets ``module._hf_hook``, a plain attribute: in __dict__ (hasattr would
        # fall through Module.__getattr__ and its AttributeError, ~4 µs per call when absent).
        return bool(base_layer._forward_hooks or base_layer._forward_pre_hooks or "_hf_hook" in base_layer.__dict__)

    def _direct_operands(self, active: list[str], layer_type: type, flatten: bool = False):
        """(lora_a, lora_b, lora_b_bias, scaling, dropout_p, training) of the active adapters, in the op's order, read
        straight from their parameters; None when an adapter must run its own forward instead.

        Its own forward is needed when input casting is off (the op casts; the uncast input must go through A's
        forward), for hotswap-prepared tensor scalings (float() would break compile), and for an A or B layer that
        is not exactly ``layer_type`` or that a wrapper materializes in its forward (hooks, FSDP units, offload,
        accelerate's add_hook_to_module, which replaces ``forward``): the op would read sharded or stale weights.

        One pass through the modules' own dicts: this runs per layer per token at decode, where each
        Module.__getattr__ (~2 µs on the CI box) is a visible part of the cost. ``flatten``: 1×1 conv adapters,
        their weights viewed (r, K) and (N, r)."""
        if not self.cast_input_dtype_enabled:
            return None
        modules = self._modules
        lora_a_dict, lora_b_dict = modules["lora_A"]._modules, modules["lora_B"]._modules
        dropout_dict, scaling = modules["lora_dropout"]._modules, self.scaling
        lora_a, lora_b, lora_b_bias, dropout_p, scales = [], [], [], [], []
        training = False
        for adapter in active:
            scale = scaling[adapter]
            if isinstance(scale, torch.Tensor):
                return None
            a_layer, b_layer, dropout = lora_a_dict[adapter], lora_b_dict[adapter], dropout_dict[adapter]
            for layer in (a_layer, b_layer):
                if type(layer) is not layer_type or layer._forward_pre_hooks or layer._forward_hooks:
                    return None
                if "forward" in layer.__dict__:  # accelerate's add_hook_to_module replaces forward
                    return None
            a_weight, b_weight = _parameter(a_layer, "weight"), _parameter(b_layer, "weight")
            lora_a.append(a_weight.flatten(1) if flatten else a_weight)
            lora_b.append(b_weight.flatten(1) if flatten else b_weight)
            lora_b_bias.append(_parameter(b_layer, "bias"))
            scales.append(scale)
            if isinstance(dropout, nn.Dropout):
                dropout_p.append(dropout.p)
                training = training or dropout.training
            else:
                dropout_p.append(0.0)
        return lora_a, lora_b, lora_b_bias, scales, dropout_p, training

    @staticmethod
    def _fused_linear(x, weight, bias, lora_a, lora_b, lora_b_bias, scales, dropout_p, training, weight_scale=None):
        """``ops.lora_linear_multi`` over operands from ``_direct_operands`` (shared by every layer type).

        x: (*, K); weight: (N, K) (int8 with ``weight_scale`` (N,) fp32 for an int8 base). Under autocast a float
        base runs as autocast's F.linear / conv2d would: every operand in the autocast dtype.
        """
        # _is_any_autocast_enabled first: one call (0.3 µs) where the per-device test also builds x.device (~3 µs).
        if weight_scale is None and torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
            lora_a = [t.to(dtype) for t in lora_a]
            lora_b = [t.to(dtype) for t in lora_b]
            lora_b_bias = [t.to(dtype) if t is not None else None for t in lora_b_bias]
        return ops.lora_linear_multi(
            x, weight, bias, lora_a, lora_b, lora_b_bias, scales, dropout_p, training, weight_scale=weight_scale
        )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W += ΔW_a for each adapter (and b += s·b_B with lora_bias); ``safe_merge`` checks finiteness first."""
        store = getattr(self, self._adapter_store)
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in store:
                self._merge_into_base(adapter, self.get_delta_weight(adapter), safe_merge)

    def _merge_into_base(self, adapter: str, delta: torch.Tensor, safe_merge: bool) -> None:
        base_layer = self.get_base_layer()
        bias_delta = self.lora_B[adapter].bias * self.scaling[adapter] if self.lora_bias[adapter] else None
        if safe_merge:
            merged = base_layer.weight.data.clone()
            merged += delta.to(merged.dtype)
            new_bias = base_layer.bias + bias_delta if bias_delta is not None else None
            for tensor in (merged, new_bias):
                if tensor is not None and not torch.isfinite(tensor).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            base_layer.weight.data = merged
            if new_bias is not None:
                base_layer.bias.data = new_bias.to(base_layer.bias.dtype)
        else:
            base_layer.weight.data += delta.to(base_layer.weight.dtype)
            if bias_delta is not None:
                base_layer.bias.data += bias_delta.to(base_layer.bias.dtype)
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """W -= ΔW_a (and b -= s·b_B with lora_bias) in reverse merge order; the int8 layer overrides it."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.scaling:  # every layer type's adapters (Embedding's live in lora_embedding_A/B)
                base_layer.weight.data -= self.get_delta_weight(adapter).to(base_layer.weight.dtype)
                if self.lora_bias[adapter]:
                    base_layer.bias.data -= (self.lora_B[adapter].bias * self.scaling[adapter]).to(
                        base_layer.bias.dtype
                    )

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        """Sample i uses adapter adapter_names[i] ("__base__": none): the base layer's forward, then each adapter's
        eager update on its own samples. The path of every layer type without a fused one (Conv2d, int8 and
        quantized bases); Linear overrides it with ``ops.lora_linear_mixed``."""
        result = self.base_layer(x, *args, **kwargs)
        store = getattr(self, self._adapter_store)
        return add_grouped_updates(result, x, adapter_names, store, self._eager_lora_update)


class Linear(nn.Module, LoraLayer):
    """LoRA over ``nn.Linear`` / ``Conv1D``: y = base(x) + Σ_a s_a·B_a A_a dropout_a(x)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        is_target_conv_1d_layer: bool = False,
        init_lora_weights: Union[bool, str] = True,
        use_rslora: bool = False,
        lora_bias: bool = False,
        inference_mode: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(
            adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias, inference_mode
        )
        self.is_target_conv_1d_layer = is_target_conv_1d_layer

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW = transpose(B·A, fan_in_fan_out)·s, computed in fp32 for 16-bit weights on CPU."""
        weight_a, weight_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return _low_rank_delta(weight_b, weight_a, self.scaling[adapter], self.fan_in_fan_out)

    def _fused_operands(self, base_layer: nn.Module, active: list[str]):
        """(weight (N, K), bias, *``_direct_operands``) when the op computes exactly what the base layer's forward
        would: a plain, hook-free nn.Linear or GPT-2 Conv1D (not a subclass, which may differ), adapters read
        directly; else None (PEFT's eager formula runs). Conv1D stores W as (in, out): its transposed view is the
        (out, in) weight the op expects, no copy."""
        base_type = type(base_layer)
        if base_type is not nn.Linear and not (base_type.__name__ == "Conv1D" and is_conv1d(base_layer)):
            return None
        if self._base_is_hooked(base_layer):
            return None
        adapters = self._direct_operands(active, nn.Linear)
        if adapters is None:
            return None
        weight = _parameter(base_layer, "weight")
        return (weight.t() if self.fan_in_fan_out else weight, _parameter(base_layer, "bias"), *adapters)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._branch_forward(x, *args, **kwargs)

    def _lora_forward(self, x: torch.Tensor, active: list[str], args, kwargs) -> torch.Tensor:
        operands = None if args or kwargs else self._fused_operands(self._modules["base_layer"], active)
        if operands is None:
            return self._eager_forward(x, active, args, kwargs)
        return self._fused_linear(x, *operands)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        return linear_mixed_forward(self, x, args, kwargs, adapter_names)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Embedding(nn.Module, LoraLayer):
    """LoRA over ``nn.Embedding``: y = E[x] + s · (A_ᵀ[x]) · Bᵀ with A (r, num_embeddings), B (dim, r)."""

    _adapter_store = "lora_embedding_A"

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
        if lora_bias:
            raise ValueError(f"lora_bias={lora_bias} is not supported for {self.__class__.__name__}.")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(
            adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias, inference_mode
        )

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        """A (r, num_embeddings), B (embedding_dim, r) as Parameters. PEFT also creates a dropout module for
        embeddings but never applies it; the template keeps it for identical state."""
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn((r, self.in_features)))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn((self.out_features, r)))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        weight_a, weight_b = self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]
        return _low_rank_delta(weight_b, weight_a, self.scaling[adapter], True)

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(
            x,
            weight,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )

    def _eager_lora_update(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """s · (A_ᵀ[x]) · Bᵀ: the embedding's low-rank update (PEFT never applies dropout to embeddings)."""
        after_a = self._embed(x, self.lora_embedding_A[adapter].T)
        return (after_a @ self.lora_embedding_B[adapter].T) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._branch_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
