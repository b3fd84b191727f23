"""LoraConfig with every PEFT 0.21.2 field, in PEFT's order.

Fields of LoRA variants that peft_kernels does not implement (DoRA, EVA, CorDA, LoftQ, aLoRA, …) are accepted,
stored and written back unchanged, so any PEFT adapter_config.json loads; a non-default value of one of them
fails at injection time with a NotImplementedError naming the field.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...config import PeftConfig
from ...utils.peft_types import PeftType


@dataclass
class LoraRuntimeConfig:
    """Runtime-only LoRA settings; never serialized."""

    ephemeral_gpu_offload: bool = field(default=False)


@dataclass
class LoftQConfig:
    """LoftQ initialization settings (accepted and serialized; LoftQ itself is not implemented)."""

    loftq_bits: int = field(default=4, metadata={"help": "Quantization bits for LoftQ"})
    loftq_iter: int = field(default=1, metadata={"help": "Alternating iterations for LoftQ"})


# init_lora_weights values that need data or decompositions peft_kernels does not implement.
UNSUPPORTED_INITS = ("eva", "olora", "pissa", "corda", "loftq", "orthogonal", "mica", "lora_ga")

# field -> its default: a different value is rejected at injection (see module docstring).
UNSUPPORTED_NON_DEFAULT_FIELDS = {
    "use_dora": False,
    "trainable_token_indices": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "layer_replication": None,
    "target_parameters": None,
    "ensure_weight_tying": False,
    "use_qalora": False,
    "monteclora_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "megatron_config": None,
}


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter: y = W x + b + (lora_alpha / r) · B A dropout(x)."""

    r: int = field(default=8, metadata={"help": "Lora attention dimension"})
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    lora_alpha: int = field(default=8, metadata={"help": "Lora alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "Lora dropout"})
    fan_in_fan_out: bool = field(default=False)
    bias: Literal["none", "all", "lora_only"] = field(default="none")
    use_rslora: bool = field(default=False)
    modules_to_save: Optional[list[str]] = field(default=None)
    init_lora_weights: Union[bool, str] = field(default=True)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)
    megatron_config: Optional[dict] = field(default=None)
    megatron_core: Optional[str] = field(default="megatron.core")
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(default=None)
    loftq_config: Union[LoftQConfig, dict] = field(default_factory=dict)
    eva_config: Optional[dict] = field(default=None)
    corda_config: Optional[dict] = field(default=None)
    lora_ga_config: Optional[dict] = field(default=None)
    use_dora: bool = field(default=False)
    velora_config: Optional[dict] = field(default=None)
    alora_invocation_tokens: Optional[list[int]] = field(default=None)
    use_qalora: bool = field(default=False)
    qalora_group_size: int = field(default=16)
    monteclora_config: Optional[dict] = field(default=None)
    layer_replication: Optional[list[tuple[int, int]]] = field(default=None)
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig)
    lora_bias: bool = field(default=False)
    target_parameters: Optional[list[str]] = field(default=None)
    use_bdlora: Optional[dict] = field(default=None)
    arrow_config: Optional[dict] = field(default=None)
    kasa_config: Optional[dict] = field(default=None)
    ensure_weight_tying: bool = field(default=False)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("runtime_config")
        return d

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.LORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.runtime_config, dict):
            self.runtime_config = LoraRuntimeConfig(**self.runtime_config)
        if isinstance(self.target_parameters, str):
            raise TypeError("`target_parameters` must be a list of strings or None.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if self.use_dora and self.megatron_config:
            raise ValueError("DoRA does not support megatron_core, please set `use_dora=False`.")
        if self.init_lora_weights == "loftq":
            if not self.loftq_config:
                raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
            if not isinstance(self.loftq_config, dict):
                self.loftq_config = vars(self.loftq_config)
        elif self.loftq_config:
            self.loftq_config = {}
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.")
        if self.lora_bias:
            if self.init_lora_weights not in (True, False):
                raise ValueError(
                    "The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
                    f"init_lora_weights={self.init_lora_weights} instead."
                )
            if self.use_dora:
                raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        if self.ensure_weight_tying:
            self.modules_to_tie = None
            self.target_modules_to_tie = None
        self._custom_modules = None

    def _register_custom_module(self, mapping: dict) -> None:
        """Registers extra layer types -> LoRA layer classes (PEFT's experimental hook)."""
        if self._custom_modules is None:
            self._custom_modules = {}
        self._custom_modules.update(mapping)

    def unsupported_settings(self) -> list[str]:
        """Names and values of the settings peft_kernels cannot inject; empty when everything is supported."""
        found = []
        for name, default in UNSUPPORTED_NON_DEFAULT_FIELDS.items():
            value = getattr(self, name)
            if value != default and not (default is None and value in ({}, [])):
                found.append(f"{name}={value!r}")
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() != "gaussian":
            if any(init.lower().startswith(prefix) for prefix in UNSUPPORTED_INITS):
                found.append(f"init_lora_weights={init!r}")
            else:
                found.append(f"init_lora_weights={init!r} (unknown value)")
        return found
