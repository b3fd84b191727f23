"""Issue #18 item 3 (behaviour bugs that changed results), one test per bullet, each against real peft 0.21.2:
both libraries run the same steps on the same tiny model and must end in the same observable state."""

from __future__ import annotations

import warnings

import pytest
import torch
from _tolerances import FP32_SAME_MATH, assert_close
from torch import nn

import peft_kernels as pk

pytestmark = [pytest.mark.usefixtures("one_thread_quiet"), pytest.mark.oracle]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def _libs():
    return (pytest.importorskip("peft"), pk)


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_get_peft_model_twice_warns_and_goes_on():
    results = []
    for lib in _libs():
        base = _mlp()
        lib.get_peft_model(base, lib.LoraConfig(target_modules=["0"]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = lib.get_peft_model(base, lib.LoraConfig(target_modules=["0"]))
        messages = [str(w.message) for w in caught]
        assert any("modify a model with PEFT for a second time" in m for m in messages)
        results.append((list(model.peft_config), model(torch.ones(1, 4)).shape))
    assert results[0] == results[1]


def test_base_module_named_lora_is_frozen():
    results = []
    for lib in _libs():
        net = nn.Sequential()
        net.add_module("lora_head", nn.Linear(4, 4))
        net.add_module("lin", nn.Linear(4, 4))
        results.append(_trainable(lib.get_peft_model(net, lib.LoraConfig(target_modules=["lin"]))))
    assert (
        results[1]
        == results[0]
        == ["base_model.model.lin.lora_A.default.weight", "base_model.model.lin.lora_B.default.weight"]
    )


def test_targeted_module_names_lists_each_module_once():
    results = []
    for lib in _libs():
        model = lib.get_peft_model(_mlp(), lib.LoraConfig(target_modules=["0"]))
        model.add_adapter("b", lib.LoraConfig(target_modules=["0", "2"]))
        results.append(model.targeted_module_names)
    assert results[1] == results[0] == ["0", "2"]


def test_disable_adapter_keeps_layers_disabled_before_entry():
    results = []
    x = torch.randn(2, 4)
    for lib in _libs():
        model = lib.get_peft_model(_mlp(), lib.LoraConfig(target_modules=["0"], init_lora_weights=False))
        states = []
        with model.disable_adapter():  # enabled before: enabled after
            pass
        states.append(model.base_model.model[0].disable_adapters)
        model.base_model.disable_adapter_layers()
        with model.disable_adapter():
            with model.disable_adapter():
                pass
        states.append(model.base_model.model[0].disable_adapters)
        with torch.no_grad():
            states.append(
                torch.equal(model(x), model.base_model.model[2](torch.relu(model.base_model.model[0].base_layer(x))))
            )
        results.append(states)
    assert results[1] == results[0] == [False, True, True]


def test_delete_unmerged_adapter_keeps_other_merged():
    results = []
    x = torch.randn(2, 4)
    for lib in _libs():
        model = lib.get_peft_model(_mlp(), lib.LoraConfig(target_modules=["0"], init_lora_weights=False))
        model.add_adapter("b", lib.LoraConfig(target_modules=["0"], init_lora_weights=False))
        with torch.no_grad():
            expected = model(x)
            model.base_model.model[0].merge(adapter_names=["default"])
            model.delete_adapter("b")
            out = model(x)
        results.append(
            (
                model.base_model.model[0].merged_adapters,
                model.active_adapters,
                torch.allclose(out, expected, atol=1e-5),
            )
        )
    assert results[1] == results[0] == (["default"], ["default"], True)


@pytest.mark.parametrize("first_trainable", [False, True])
def test_requires_grad_after_loading_matches_peft(tmp_path, first_trainable):
    results = []
    for lib in _libs():
        path = tmp_path / lib.__name__
        config = lib.LoraConfig(target_modules=["0"], modules_to_save=["2"])
        lib.get_peft_model(_mlp(), config).save_pretrained(path)
        biased = lib.get_peft_model(_mlp(), lib.LoraConfig(target_modules=["0"], bias="all"))
        biased.save_pretrained(tmp_path / f"{lib.__name__}_bias")
        frozen = lib.PeftModel.from_pretrained(_mlp(), tmp_path / f"{lib.__name__}_bias", is_trainable=first_trainable)
        model = lib.PeftModel.from_pretrained(_mlp(), path, is_trainable=first_trainable)
        states = [_trainable(frozen), _trainable(model)]
        model.load_adapter(path, adapter_name="b", is_trainable=True)
        states.append(_trainable(model))
        model.load_adapter(path, adapter_name="c", is_trainable=False)
        states.append(_trainable(model))
        results.append(states)
    assert results[1] == results[0]
    assert any(".b." in name for name in results[1][2]), "a second adapter loaded as trainable trains"


def test_saved_bias_entries_load_into_a_differently_configured_adapter():
    results = []
    x = torch.randn(2, 4)
    for lib in _libs():
        config = dict(target_modules=["0"], bias="all", lora_bias=True, init_lora_weights=False)
        trained = lib.get_peft_model(_mlp(), lib.LoraConfig(**config))
        with torch.no_grad():
            for name, param in trained.named_parameters():
                if name.endswith("bias"):
                    param.add_(1.0)
        state = lib.get_peft_model_state_dict(trained)
        receiver = lib.get_peft_model(_mlp(), lib.LoraConfig(target_modules=["0"], init_lora_weights=False))
        result = lib.set_peft_model_state_dict(receiver, state)
        with torch.no_grad():
            results.append((sorted(result.unexpected_keys), receiver(x)))
    assert results[1][0] == results[0][0] == ["base_model.model.0.lora_B.bias"]
    assert_close(results[1][1], results[0][1], FP32_SAME_MATH, "outputs after the round trip")


def test_unload_returns_the_original_module_when_its_copy_is_inactive():
    results = []
    for lib in _libs():
        model = lib.get_peft_model(_mlp(), lib.LoraConfig(target_modules=["0"], modules_to_save=["2"]))
        with torch.no_grad():
            model.base_model.model[2].modules_to_save["default"].weight.add_(1.0)
        model.add_adapter("other", lib.LoraConfig(target_modules=["0"]))
        model.set_adapter("other")
        results.append(model.unload()[2].weight.clone())
    assert torch.equal(results[1], results[0]) and torch.equal(results[1], _mlp()[2].weight)


def test_unload_inside_disable_adapter_returns_the_active_copy():
    """PEFT unwraps modules_to_save by the active adapter, enabled or not: inside disable_adapter() unload()
    keeps the trained copy (here made to differ from the original)."""
    results = []
    for lib in _libs():
        model = lib.get_peft_model(_mlp(), lib.LoraConfig(target_modules=["0"], modules_to_save=["2"]))
        with torch.no_grad():
            model.base_model.model[2].modules_to_save["default"].weight.add_(1.0)
        with model.disable_adapter():
            unloaded = model.unload()
        results.append(unloaded[2].weight.detach().clone())
    assert torch.equal(results[1], results[0]) and torch.equal(results[1], _mlp()[2].weight + 1.0)


def test_ignore_mismatched_sizes_is_honoured_like_peft(tmp_path):
    results = []
    for lib in _libs():
        path = tmp_path / lib.__name__
        lib.get_peft_model(_mlp(), lib.LoraConfig(target_modules=["0"], r=4)).save_pretrained(path)
        model = lib.get_peft_model(_mlp(), lib.LoraConfig(target_modules=["0"], r=8))
        before = model.base_model.model[0].lora_A["default"].weight.clone()
        with pytest.raises(RuntimeError):  # without the flag: PEFT's exception type
            model.load_adapter(path, adapter_name="default")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = model.load_adapter(path, adapter_name="default", ignore_mismatched_sizes=True)
        message = next(str(w.message) for w in caught if "ignore_mismatched_sizes" in str(w.message))
        unchanged = torch.equal(model.base_model.model[0].lora_A["default"].weight, before)
        results.append((message, sorted(result.missing_keys), unchanged))
    assert results[1] == results[0]


class _TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 20, bias=False)

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        return self.lm_head(self.proj(self.embed_tokens(ids)))


def test_targeted_embedding_saves_no_untouched_lm_head(tmp_path):
    from safetensors.torch import load_file

    results = []
    for lib in _libs():
        model = lib.get_peft_model(_TinyLM(), lib.LoraConfig(target_modules=["embed_tokens", "proj"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(tmp_path / lib.__name__)
        results.append(sorted(load_file(tmp_path / lib.__name__ / "adapter_model.safetensors")))
    assert results[1] == results[0]
    assert not any("lm_head" in key for key in results[1])
    assert "base_model.model.embed_tokens.base_layer.weight" in results[1]


@pytest.mark.parametrize("config_cls", ["PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig"])
def test_prompt_learning_without_task_type_names_it(config_cls):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=16))
    config = getattr(pk, config_cls)(
        num_virtual_tokens=2, **({"encoder_hidden_size": 8} if "Encoder" in config_cls else {})
    )
    with pytest.raises(ValueError, match=r"needs a task_type \(one of .*CAUSAL_LM.*\), got task_type=None"):
        pk.get_peft_model(base, config)
    assert config.base_model_name_or_path is None and not hasattr(base, "peft_config")


def test_low_cpu_mem_usage_puts_new_adapter_weights_on_meta_until_loaded(tmp_path):
    """PEFT: injected with low_cpu_mem_usage=True the adapter weights are on meta (nothing allocated); loading a
    checkpoint with it fills them, and the model then computes what the saved one did."""
    peft = pytest.importorskip("peft")
    x = torch.randn(3, 4)
    trained = peft.get_peft_model(_mlp(), peft.LoraConfig(target_modules=["0", "2"], init_lora_weights=False))
    trained.save_pretrained(tmp_path)
    expected = trained(x)
    devices, outputs = [], []
    for lib in _libs():
        injected = lib.inject_adapter_in_model(
            lib.LoraConfig(target_modules=["0", "2"]), _mlp(), low_cpu_mem_usage=True
        )
        devices.append(sorted((n, p.device.type) for n, p in injected.named_parameters()))
        model = lib.PeftModel.from_pretrained(_mlp(), tmp_path, low_cpu_mem_usage=True)
        model.load_adapter(tmp_path, "other", low_cpu_mem_usage=True)
        assert {p.device.type for p in model.parameters()} == {"cpu"}, lib.__name__
        outputs.append(model(x))
    assert devices[1] == devices[0]
    assert [n for n, d in devices[1] if d == "meta"] == [
        "0.lora_A.default.weight", "0.lora_B.default.weight", "2.lora_A.default.weight", "2.lora_B.default.weight"
    ]  # fmt: skip
    assert_close(outputs[1], outputs[0], FP32_SAME_MATH)
    assert_close(outputs[1], expected, FP32_SAME_MATH)


def test_two_active_adapters_with_a_copy_of_the_same_module_raise_like_peft():
    """modules_to_save copies are not additive: PEFT refuses to activate two adapters that both copy a module."""
    found = []
    for lib in _libs():
        model = lib.get_peft_model(_mlp(), lib.LoraConfig(target_modules=["0"], modules_to_save=["2"]))
        model.add_adapter("other", lib.LoraConfig(target_modules=["0"], modules_to_save=["2"]))
        with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper") as err:
            model.base_model.set_adapter(["default", "other"])
        found.append((type(err.value), str(err.value).rsplit(", got ", 1)[1], model.base_model.active_adapters))
    assert found[1] == found[0]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def test_invalid_bias_raises_not_implemented_and_leaves_the_model():
    # PEFT 0.21.2 accepts any bias string in LoraConfig and raises NotImplementedError from get_peft_model.
    for lib in _libs():
        base = _mlp()
        before, types = _state(base)
        config = lib.LoraConfig(target_modules=["0"], bias="invalid")  # the config itself does not raise
        with pytest.raises(NotImplementedError, match="invalid"):
            lib.get_peft_model(base, config)
        if lib is pk:  # ours checks before injecting: nothing was replaced
            after, after_types = _state(base)
            assert after_types == types and after.keys() == before.keys()


def test_modules_to_save_named_like_the_adapter_raises():
    # modules_to_save=["foobar"] with adapter "foobar" would match the LoRA layer's own lora_A.foobar.
    for lib in _libs():
        base = _mlp()
        _, types = _state(base)
        config = lib.LoraConfig(target_modules=["0"], modules_to_save=["foobar"])
        with pytest.raises(ValueError, match="almost certainly not the intended behavior.*'foobar'"):
            lib.get_peft_model(base, config, adapter_name="foobar")
        if lib is pk:  # rolled back: the base model has its own modules again
            assert [type(m) for m in base.modules()] == types
