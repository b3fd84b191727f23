"""PeftConfigMixin, PeftConfig, PromptLearningConfig: PEFT 0.21.2's fields, validation and JSON format."""

from __future__ import annotations

import enum
import inspect
import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Union

from .utils.constants import CONFIG_NAME
from .utils.peft_types import PeftType, TaskType
from .version import PEFT_VERSION_STRING, __version__  # noqa: F401 - peft.config exposes __version__ too

# A config file must keep at least these keys after unknown ones are dropped.
MIN_EXPECTED_CONFIG_KEYS = {"peft_type"}


def _to_jsonable(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    return value


@dataclass
class PeftConfigMixin:
    """Base of every adapter config: task/peft type, version stamp, JSON I/O with forward-compatible loading."""

    task_type: Optional[Union[str, TaskType]] = field(default=None, metadata={"help": "The type of task."})
    peft_type: Optional[Union[str, PeftType]] = field(default=None, metadata={"help": "The type of PEFT model."})
    auto_mapping: Optional[dict] = field(
        default=None, metadata={"help": "An auto mapping dict to help retrieve the base model class if needed."}
    )
    peft_version: Optional[str] = field(default=None, metadata={"help": "PEFT version, leave empty to auto-fill."})

    def __post_init__(self):
        if self.task_type is not None and self.task_type not in list(TaskType):
            raise ValueError(
                f"Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                f"{', '.join(TaskType)}."
            )
        if self.peft_version is None:
            self.peft_version = PEFT_VERSION_STRING

    def to_dict(self) -> dict:
        return asdict(self)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Writes ``adapter_config.json``: key-sorted, indent 2, sets as lists, no trailing newline."""
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        auto_mapping_dict = kwargs.pop("auto_mapping_dict", None)
        output_dict = self.to_dict()
        for key, value in output_dict.items():
            if isinstance(value, set):
                output_dict[key] = list(value)
        if auto_mapping_dict is not None:
            output_dict["auto_mapping"] = auto_mapping_dict
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as writer:
            writer.write(json.dumps(_to_jsonable(output_dict), indent=2, sort_keys=True))

    @classmethod
    def from_peft_type(cls, **kwargs):
        """Builds the config class named by ``kwargs["peft_type"]`` (else ``cls``), dropping unknown keys."""
        from .mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        if "peft_type" in kwargs:
            peft_type = kwargs["peft_type"]
            if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
                raise NotImplementedError(
                    f"peft_type {peft_type!r} is not implemented by peft_kernels; supported: "
                    f"{', '.join(sorted(PEFT_TYPE_TO_CONFIG_MAPPING))}."
                )
            config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
        else:
            config_cls = cls
        try:
            return config_cls(**kwargs)
        except TypeError as exc:
            if "got an unexpected keyword argument" not in str(exc):
                raise
        known = {f.name for f in fields(config_cls)} | set(inspect.signature(config_cls).parameters)
        filtered = {k: v for k, v in kwargs.items() if k in known}
        unexpected = sorted(k for k in kwargs if k not in known)
        if not MIN_EXPECTED_CONFIG_KEYS.issubset(filtered):
            raise TypeError(
                f"The {cls.__name__} config that is trying to be loaded is missing required keys: "
                f"{MIN_EXPECTED_CONFIG_KEYS}."
            )
        warnings.warn(
            f"Unexpected keyword arguments {unexpected} for class {config_cls.__name__}, these are ignored. This "
            "probably means that you're loading a configuration file that was saved using a higher version of the "
            "library and additional parameters have been introduced since."
        )
        return config_cls(**filtered)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Reads ``adapter_config.json`` from a local folder (or the Hub cache) and builds the right class."""
        path = (
            os.path.join(pretrained_model_name_or_path, subfolder)
            if subfolder is not None
            else pretrained_model_name_or_path
        )
        hf_hub_download_kwargs, class_kwargs, _ = cls._split_kwargs(kwargs)
        config_file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_file):
            config_file = _hub_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder, hf_hub_download_kwargs)
            if config_file is None:
                raise ValueError(f"Can't find '{CONFIG_NAME}' at '{pretrained_model_name_or_path}'")
        loaded = cls.from_json_file(config_file)
        if "runtime_config" in loaded:
            warnings.warn("The configuration file contains a `runtime_config` key. This is ignored.")
            del loaded["runtime_config"]
        kwargs = {**class_kwargs, **loaded}
        return cls.from_peft_type(**kwargs)

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs) -> dict:
        with open(path_json_file) as file:
            json_object = json.load(file)
        if "runtime_config" in json_object:
            warnings.warn("The configuration file contains a `runtime_config` key. This is ignored.")
            del json_object["runtime_config"]
        return json_object

    @classmethod
    def _split_kwargs(cls, kwargs):
        hub_params = {"cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "repo_type"}
        hub_kwargs, class_kwargs, other = {}, {}, {}
        field_names = {f.name for f in fields(cls)}
        for key, value in kwargs.items():
            if key in hub_params:
                hub_kwargs[key] = value
            elif key in field_names:
                class_kwargs[key] = value
            else:
                other[key] = value
        return hub_kwargs, class_kwargs, other

    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False


def _hub_file(repo_id: str, filename: str, subfolder: Optional[str], hub_kwargs: dict) -> Optional[str]:
    """Path of a file in the local Hub cache (or downloaded when online), or None."""
    if os.path.isdir(repo_id) or repo_id.count("/") > 1:
        return None
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id, filename, subfolder=subfolder, **hub_kwargs)
    except Exception:  # offline, missing repo, missing file: all mean "not found" to the caller
        return None


@dataclass
class PeftConfig(PeftConfigMixin):
    """Base configuration of a non-prompt-learning adapter."""

    base_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "The name of the base model to use."}
    )
    revision: Optional[str] = field(default=None, metadata={"help": "The specific base model version to use."})
    peft_type: Optional[Union[str, PeftType]] = field(default=None, metadata={"help": "Peft type"})
    task_type: Optional[Union[str, TaskType]] = field(default=None, metadata={"help": "Task type"})
    inference_mode: bool = field(default=False, metadata={"help": "Whether to use inference mode"})


@dataclass
class PromptLearningConfig(PeftConfig):
    """Base configuration of prefix tuning, P-tuning and prompt tuning."""

    num_virtual_tokens: int = field(default=None, metadata={"help": "Number of virtual tokens"})
    token_dim: int = field(
        default=None, metadata={"help": "The hidden embedding dimension of the base transformer model"}
    )
    num_transformer_submodules: Optional[int] = field(
        default=None, metadata={"help": "Number of transformer submodules"}
    )
    num_attention_heads: Optional[int] = field(default=None, metadata={"help": "Number of attention heads"})
    num_layers: Optional[int] = field(default=None, metadata={"help": "Number of transformer layers"})
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "List of extra modules to be set as trainable and saved in the final checkpoint"},
    )

    @property
    def is_prompt_learning(self) -> bool:
        return True
