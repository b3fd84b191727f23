"""docs/PEFT_CONTRACT.md §2-3: enums, config fields and defaults, validation messages, JSON, forward compatibility."""

import dataclasses
import json
import os
import warnings

import pytest

import peft_kernels as pk
from peft_kernels.utils import CONFIG_NAME

CONFIG_CLASSES = ["LoraConfig", "PrefixTuningConfig", "PromptEncoderConfig", "PromptTuningConfig"]


def test_enums_are_str_enums():
    assert pk.TaskType.CAUSAL_LM == "CAUSAL_LM"
    assert [t.value for t in pk.TaskType] == [
        "SEQ_CLS",
        "SEQ_2_SEQ_LM",
        "CAUSAL_LM",
        "TOKEN_CLS",
        "QUESTION_ANS",
        "FEATURE_EXTRACTION",
    ]
    assert len(pk.PeftType) == 45 and pk.PeftType.LORA == "LORA"
    assert json.dumps(pk.PeftType.LORA) == '"LORA"'
    assert [v.value for v in pk.PromptTuningInit] == ["TEXT", "SAMPLE_VOCAB", "RANDOM"]


@pytest.mark.oracle
@pytest.mark.parametrize("name", CONFIG_CLASSES + ["LoraRuntimeConfig", "LoftQConfig"])
def test_fields_and_defaults_match_peft(name):
    peft = pytest.importorskip("peft")

    def describe(cls):
        out = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
                default = default if isinstance(default, (dict, list)) else type(default).__name__
            else:
                default = "MISSING"
            out.append((f.name, getattr(default, "value", default)))
        return out

    assert describe(getattr(pk, name)) == describe(getattr(peft, name))


@pytest.mark.oracle
@pytest.mark.parametrize("name", CONFIG_CLASSES)
def test_json_matches_peft(name, tmp_path):
    peft = pytest.importorskip("peft")
    kwargs = {"task_type": "CAUSAL_LM"}
    if name != "LoraConfig":
        kwargs["num_virtual_tokens"] = 5
    else:
        kwargs.update(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q", "v"])
    getattr(pk, name)(**kwargs).save_pretrained(tmp_path / "ours")
    getattr(peft, name)(**kwargs).save_pretrained(tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    theirs = json.loads((tmp_path / "theirs" / CONFIG_NAME).read_text())
    ours.pop("peft_version"), theirs.pop("peft_version")
    for d in (ours, theirs):
        if isinstance(d.get("target_modules"), list):
            d["target_modules"] = sorted(d["target_modules"])
    assert ours == theirs


def test_json_format(tmp_path):
    config = pk.LoraConfig(r=4, target_modules=["b", "a"])
    config.save_pretrained(tmp_path)
    text = (tmp_path / CONFIG_NAME).read_text()
    assert not text.endswith("\n")
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert sorted(data["target_modules"]) == ["a", "b"]
    assert "runtime_config" not in data
    assert data["peft_type"] == "LORA" and data["r"] == 4
    assert data["peft_version"].startswith("0.21.2+peft.kernels")
    assert json.dumps(json.loads(text), indent=2, sort_keys=True) == text


def test_config_round_trip(tmp_path):
    config = pk.LoraConfig(r=3, lora_alpha=7, target_modules="lin.*", use_rslora=True, bias="lora_only")
    config.save_pretrained(tmp_path)
    loaded = pk.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, pk.LoraConfig)
    assert (loaded.r, loaded.lora_alpha, loaded.target_modules, loaded.use_rslora, loaded.bias) == (
        3,
        7,
        "lin.*",
        True,
        "lora_only",
    )
    assert pk.get_peft_config(config.to_dict()).r == 3


def test_unknown_keys_are_dropped_with_warning(tmp_path):
    data = pk.LoraConfig(r=2).to_dict()
    data.pop("runtime_config", None)
    data.update(enable_lora=None, merge_weights=False)
    os.makedirs(tmp_path, exist_ok=True)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data, default=list))
    with pytest.warns(
        UserWarning, match=r"Unexpected keyword arguments \['enable_lora', 'merge_weights'\] for class LoraConfig"
    ):
        loaded = pk.LoraConfig.from_pretrained(tmp_path)
    assert loaded.r == 2


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json' at"):
        pk.PeftConfig.from_pretrained(str(tmp_path))


def test_save_into_a_file_path_fails(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(AssertionError, match=r"should be a directory, not a file"):
        pk.LoraConfig().save_pretrained(str(path))


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        (
            dict(task_type="FOO"),
            ValueError,
            "Invalid task type: 'FOO'. Must be one of the following task types: "
            "SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION.",
        ),
        (
            dict(target_modules="x", layers_to_transform=[0]),
            ValueError,
            "`layers_to_transform` cannot be used when `target_modules` is a str.",
        ),
        (
            dict(target_modules="x", layers_pattern="h"),
            ValueError,
            "`layers_pattern` cannot be used when `target_modules` is a str.",
        ),
        (
            dict(target_modules=["x"], layers_pattern="h"),
            ValueError,
            "When `layers_pattern` is specified, `layers_to_transform` must also be specified. ",
        ),
        (
            dict(lora_bias=True, init_lora_weights="gaussian"),
            ValueError,
            "The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
            "init_lora_weights=gaussian instead.",
        ),
        (
            dict(lora_bias=True, use_dora=True),
            ValueError,
            "The argument lora_bias=True is not supported for DoRA, please pass use_dora=False",
        ),
        (
            dict(init_lora_weights="loftq"),
            ValueError,
            "`loftq_config` must be specified when `init_lora_weights` is 'loftq'.",
        ),
    ],
)
def test_lora_config_validation(kwargs, exc, message):
    with pytest.raises(exc) as info:
        pk.LoraConfig(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"),
            "When prompt_tuning_init='TEXT', tokenizer_name_or_path can't be None.",
        ),
        (
            dict(prompt_tuning_init="TEXT", tokenizer_name_or_path="tok"),
            "When prompt_tuning_init='TEXT', prompt_tuning_init_text can't be None.",
        ),
        (dict(tokenizer_kwargs={"a": 1}), "tokenizer_kwargs only valid when using prompt_tuning_init='TEXT'."),
    ],
)
def test_prompt_tuning_config_validation(kwargs, message):
    with pytest.raises(ValueError) as info:
        pk.PromptTuningConfig(num_virtual_tokens=4, **kwargs)
    assert str(info.value) == message


def test_lora_config_post_init():
    config = pk.LoraConfig(target_modules=["a", "b"], exclude_modules=["c"])
    assert config.target_modules == {"a", "b"} and config.exclude_modules == {"c"}
    assert config.peft_type == pk.PeftType.LORA
    with pytest.warns(UserWarning, match="`loftq_config` specified but will be ignored"):
        assert pk.LoraConfig(loftq_config={"loftq_bits": 4}).loftq_config == {}
    assert not config.is_prompt_learning and pk.PromptTuningConfig(num_virtual_tokens=2).is_prompt_learning


def test_out_of_scope_fields_round_trip_and_fail_at_injection(tmp_path):
    from _models import make_mlp

    config = pk.LoraConfig(target_modules=["lin0"], use_dora=True)
    config.save_pretrained(tmp_path)
    assert pk.PeftConfig.from_pretrained(tmp_path).use_dora is True
    with pytest.raises(NotImplementedError, match="use_dora=True"):
        pk.get_peft_model(make_mlp(), config)
    with pytest.raises(NotImplementedError, match="init_lora_weights='pissa'"):
        pk.get_peft_model(make_mlp(), pk.LoraConfig(target_modules=["lin0"], init_lora_weights="pissa"))


def test_unimplemented_peft_type():
    with pytest.raises(NotImplementedError, match="IA3"):
        pk.get_peft_config({"peft_type": "IA3"})


def test_removed_alias_is_absent():
    with pytest.raises(ImportError):
        from peft_kernels import prepare_model_for_int8_training  # noqa: F401


def test_no_warning_on_plain_construction():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pk.LoraConfig(r=4, target_modules=["q"])
