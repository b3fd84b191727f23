"""docs/PEFT_CONTRACT.md §4-6, §9, §12: LoRA behaviour on PEFT's MLP and tiny GPT-2, and errors that leave the model intact."""

import math
import os
import warnings

import pytest
import torch
from _models import EmbMLP, logits_of, make_inputs, make_mlp, make_model
from _tolerances import FP32_SAME_MATH, MERGE, assert_close

import peft_kernels as pk
from peft_kernels.layers import BaseTunerLayer
from peft_kernels.tuners.lora import Linear

X = torch.arange(90).view(9, 10).float() / 90


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def lora_mlp(**kwargs):
    kwargs.setdefault("target_modules", ["lin0"])
    return pk.get_peft_model(make_mlp(), pk.LoraConfig(**kwargs)).eval()


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: type(m) for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_untouched(model, before):
    state, types, grads = before
    now_state, now_types, now_grads = snapshot(model)
    assert now_types == types
    assert now_grads == grads
    assert set(now_state) == set(state)
    for key in state:
        assert torch.equal(now_state[key], state[key]), key
    assert "peft_config" not in model.__dict__


# ----------------------------------------------------------------------------------- forward and init
def test_forward_formula_and_scaling():
    model = lora_mlp(r=4, lora_alpha=8, init_lora_weights=False)
    layer = model.base_model.model.lin0
    assert isinstance(layer, Linear) and repr(layer).startswith("lora.Linear(")
    assert layer.scaling["default"] == 2.0
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    expected = X @ w.T + bias + 2.0 * (X @ a.T @ b.T)
    assert_close(layer(X), expected, FP32_SAME_MATH, "lora.Linear forward")
    assert lora_mlp(r=4, lora_alpha=8, use_rslora=True).base_model.model.lin0.scaling["default"] == 4.0


def test_rank_and_alpha_pattern():
    model = lora_mlp(target_modules=["lin0", "lin1"], r=8, rank_pattern={"lin1": 2}, alpha_pattern={"lin1": 16})
    lin1 = model.base_model.model.lin1
    assert lin1.r["default"] == 2 and lin1.scaling["default"] == 8.0
    assert model.base_model.model.lin0.r["default"] == 8


def test_init_true_is_a_noop_and_false_is_not():
    base = make_mlp()(X)
    assert torch.equal(lora_mlp()(X), base)
    assert not torch.allclose(lora_mlp(init_lora_weights=False)(X), base)
    layer = lora_mlp(r=8).base_model.model.lin0
    assert layer.lora_A["default"].weight.abs().max() <= 1 / math.sqrt(10)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    torch.manual_seed(0)
    big = pk.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(512, 512)),
        pk.LoraConfig(target_modules=["0"], r=8, init_lora_weights="gaussian"),
    )
    std = big.base_model.model[0].lora_A["default"].weight.std().item()
    assert abs(std - 1 / 8) < 0.01


def test_dropout_training_vs_eval():
    model = lora_mlp(init_lora_weights=False, lora_dropout=0.5)
    model.train()
    torch.manual_seed(1)
    a = model(X)
    torch.manual_seed(1)
    b = model(X)
    torch.manual_seed(2)
    c = model(X)
    assert torch.equal(a, b), "same torch seed -> same dropout mask"
    assert not torch.equal(a, c)
    model.eval()
    assert torch.equal(model(X), model(X))


# ----------------------------------------------------------------------------------- targeting
def test_regex_and_all_linear_and_layers_to_transform():
    model = lora_mlp(target_modules="lin.")
    assert {n for n, m in model.named_modules() if isinstance(m, Linear)} == {
        "base_model.model.lin0",
        "base_model.model.lin1",
    }
    gpt2, _ = make_model("gpt2")
    config = pk.LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM")
    pk.get_peft_model(gpt2, config)
    assert "lm_head" not in config.target_modules and "transformer.h.0.attn.c_attn" in config.target_modules
    gpt2, _ = make_model("gpt2")
    model = pk.get_peft_model(gpt2, pk.LoraConfig(layers_to_transform=[1], task_type="CAUSAL_LM"))
    targeted = [n for n, m in model.named_modules() if isinstance(m, Linear)]
    assert targeted == ["base_model.model.transformer.h.1.attn.c_attn"]


def test_conv1d_sets_fan_in_fan_out(tmp_path):
    gpt2, _ = make_model("gpt2")
    config = pk.LoraConfig(task_type="CAUSAL_LM")
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        pk.get_peft_model(gpt2, config)
    assert config.fan_in_fan_out is True


def test_exclude_and_modules_to_save():
    model = lora_mlp(target_modules="lin.", exclude_modules="lin1")
    assert not isinstance(model.base_model.model.lin1, BaseTunerLayer)
    model = lora_mlp(target_modules=["lin0"], modules_to_save=["lin1"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.lin1.modules_to_save.default.weight" in trainable
    assert "base_model.model.lin1.original_module.weight" not in trainable
    keys = set(pk.get_peft_model_state_dict(model))
    assert {"base_model.model.lin1.weight", "base_model.model.lin1.bias"} <= keys


@pytest.mark.parametrize(
    "bias, expected",
    [
        ("none", set()),
        ("all", {"base_model.model.lin0.base_layer.bias", "base_model.model.lin1.bias"}),
        ("lora_only", {"base_model.model.lin0.base_layer.bias"}),
    ],
)
def test_bias_modes(bias, expected):
    model = lora_mlp(bias=bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == expected
    saved = {k for k in pk.get_peft_model_state_dict(model) if "lora_" not in k}
    assert saved == expected


def test_embedding_lora_matches_formula():
    torch.manual_seed(0)
    model = pk.get_peft_model(EmbMLP(), pk.LoraConfig(target_modules=["emb"], r=4, init_lora_weights=False))
    layer = model.base_model.model.emb
    ids = torch.randint(0, 100, (3, 7))
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    expected = layer.base_layer(ids) + layer.scaling["default"] * (a.T[ids] @ b.T)
    assert_close(layer(ids), expected, FP32_SAME_MATH, "lora.Embedding")
    with torch.no_grad():
        out = model(ids)
        model.merge_adapter()
        assert_close(model(ids), out, MERGE, "embedding merged")


# ----------------------------------------------------------------------------------- adapters
def test_multi_adapter_lifecycle():
    model = lora_mlp(init_lora_weights=False)
    out_default = model(X)
    model.add_adapter("other", pk.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    assert model.active_adapter == "default"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    assert torch.equal(model(X), out_default)
    model.set_adapter("other")
    assert any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    out_other = model(X)
    assert not torch.allclose(out_other, out_default)
    model.set_adapter("default")
    assert torch.equal(model(X), out_default)
    with pytest.raises(ValueError, match="Adapter with name 'other' already exists."):
        model.add_adapter("other", pk.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="Adapter nope not found."):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="Adapter nope does not exist"):
        model.delete_adapter("nope")
    merged = model.merge_and_unload(adapter_names=["other"])
    assert_close(merged(X), out_other, MERGE, "merge_and_unload(adapter_names=['other'])")


def test_delete_active_adapter_switches():
    model = lora_mlp()
    model.add_adapter("other", pk.LoraConfig(target_modules=["lin0"]))
    model.delete_adapter("default")
    assert model.active_adapter == "other"
    assert "default" not in model.peft_config
    assert not any(".default." in k for k in model.state_dict())
    layer = model.base_model.model.lin0
    for name in layer.other_param_names:
        assert "default" not in getattr(layer, name), name


def test_second_adapter_with_bias_is_refused_without_leftovers():
    model = lora_mlp(bias="all")
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        model.add_adapter("other", pk.LoraConfig(target_modules=["lin0"], bias="all"))
    assert "other" not in model.peft_config
    assert not any(".other." in k for k in model.state_dict())


def test_mixed_batch():
    model = lora_mlp(init_lora_weights=False)
    model.add_adapter("other", pk.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    names = ["default", "other", "__base__"] * 3
    out = model(X, adapter_names=names)
    base = make_mlp()(X)
    default = model(X)
    model.set_adapter("other")
    other = model(X)
    for i, name in enumerate(names):
        expected = {"default": default, "other": other, "__base__": base}[name][i]
        assert_close(out[i], expected, FP32_SAME_MATH, f"row {i} ({name})")
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(X, adapter_names=["nope"] * 9)
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(X, adapter_names=names)


def test_disable_adapter_nesting_and_bias_warning():
    model = lora_mlp(init_lora_weights=False)
    base, adapted = make_mlp()(X), model(X)
    with model.disable_adapter():
        with model.disable_adapter():
            assert torch.equal(model(X), base)
        assert torch.equal(model(X), base)
    assert torch.equal(model(X), adapted)
    with pytest.warns(UserWarning, match="Careful, disabling adapter layers with bias configured to be 'all'"):
        with lora_mlp(bias="all").disable_adapter():
            pass


# ----------------------------------------------------------------------------------- merge
def test_merge_unmerge_unload():
    model = lora_mlp(target_modules=["lin0", "lin1"], init_lora_weights=False)
    adapted = model(X)
    model.merge_adapter()
    assert_close(model(X), adapted, MERGE, "merged")
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do."):
        model.merge_adapter()
    model.unmerge_adapter()
    assert_close(model(X), adapted, MERGE, "unmerged")
    unloaded = lora_mlp(target_modules=["lin0"], init_lora_weights=False)
    plain = unloaded.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    assert len(plain.state_dict()) == len(make_mlp().state_dict())
    assert torch.equal(plain(X), make_mlp()(X))
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not hasattr(merged, "peft_config")
    assert_close(merged(X), adapted, MERGE, "merge_and_unload")


def test_safe_merge_detects_nan():
    model = lora_mlp(init_lora_weights=False)
    with torch.no_grad():
        model.base_model.model.lin0.lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(
        ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"
    ):
        model.merge_and_unload(safe_merge=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model(dtype):
    model = pk.get_peft_model(make_mlp().to(dtype), pk.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    assert model.base_model.model.lin0.lora_A["default"].weight.dtype == torch.float32  # autocast_adapter_dtype
    out = model.base_model.model.lin0(X.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    model.merge_adapter()
    assert model.base_model.model.lin0.base_layer.weight.dtype == dtype
    kept = pk.get_peft_model(
        make_mlp().to(dtype), pk.LoraConfig(target_modules=["lin0"]), autocast_adapter_dtype=False
    )
    assert kept.base_model.model.lin0.lora_A["default"].weight.dtype == dtype


# ----------------------------------------------------------------------------------- checkpoints
def test_save_load_variants(tmp_path):
    model = lora_mlp(init_lora_weights=False)
    model.add_adapter("other", pk.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "st")
    assert sorted(os.listdir(tmp_path / "st")) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "other",
    ]
    assert "library_name: peft" in (tmp_path / "st" / "README.md").read_text()
    model.save_pretrained(tmp_path / "bin", safe_serialization=False, selected_adapters=["default"])
    assert sorted(os.listdir(tmp_path / "bin")) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    with pytest.raises(ValueError, match="You passed an invalid `selected_adapters`"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])
    expected = model(X)
    for sub in ("st", "bin"):
        loaded = pk.PeftModel.from_pretrained(make_mlp(), tmp_path / sub)
        assert torch.equal(loaded(X), expected)
        assert not any(p.requires_grad for p in loaded.parameters())
    config = pk.LoraConfig.from_pretrained(tmp_path / "st")
    loaded = pk.PeftModel.from_pretrained(make_mlp(), tmp_path / "st", config=config, is_trainable=True)
    assert loaded.peft_config["default"] is config and config.inference_mode is False
    assert any(p.requires_grad for p in loaded.parameters())
    result = loaded.load_adapter(tmp_path / "st" / "other", "other")
    assert result.missing_keys == [] and loaded.active_adapter == "default"
    loaded.set_adapter("other")
    model.set_adapter("other")
    assert torch.equal(loaded(X), model(X))


def test_substring_adapter_names_do_not_leak(tmp_path):
    model = lora_mlp()
    for name in ("default2", "other_default", "efaul"):
        model.add_adapter(name, pk.LoraConfig(target_modules=["lin0"], r=2))
    keys = pk.get_peft_model_state_dict(model, adapter_name="default")
    assert keys["base_model.model.lin0.lora_A.weight"].shape == (8, 10)
    assert len(keys) == 2


# ----------------------------------------------------------------------------------- errors leave the model intact
@pytest.mark.parametrize(
    "config, exc, match",
    [
        (dict(target_modules=["lin9"]), ValueError, r"Target modules \{'lin9'\} not found in the base model.*lin0"),
        (
            dict(target_modules=["lin0"], r=0),
            ValueError,
            "`r` should be a positive integer value but the value passed is 0",
        ),
        (dict(target_modules=["lin0"], lora_dropout=1.0), ValueError, "lora_dropout should be in"),
        (dict(target_modules=["lin0", "relu"]), ValueError, r"'relu' \(ReLU\) is not supported"),
        (dict(target_modules=["lin0"], use_dora=True), NotImplementedError, "use_dora"),
    ],
)
def test_bad_config_leaves_model_untouched(config, exc, match):
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        pk.get_peft_model(model, pk.LoraConfig(**config))
    assert_untouched(model, before)


def test_conv_target_fails_before_any_replacement():
    torch.manual_seed(0)
    # nn.Conv1d/2d/3d are supported (issues #9, #18); an nn.LSTM is not, in PEFT either (ValueError).
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LSTM(4, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match="LSTM"):
        pk.get_peft_model(model, pk.LoraConfig(target_modules=["0", "1"]))
    assert_untouched(model, before)


def test_unknown_model_type_needs_target_modules():
    with pytest.raises(ValueError, match="Please specify `target_modules` or `target_parameters`in `peft_config`"):
        pk.get_peft_model(make_mlp(), pk.LoraConfig())


def test_load_with_mismatched_shapes_names_key_and_shapes(tmp_path):
    lora_mlp(r=4, init_lora_weights=False).save_pretrained(tmp_path)
    model = pk.get_peft_model(make_mlp(), pk.LoraConfig(target_modules=["lin0"], r=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"base_model.model.lin0.lora_A.weight.*\(4, 10\).*\(8, 10\)"):
        model.load_adapter(tmp_path, "default")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_from_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        pk.PeftModel.from_pretrained(make_mlp(), tmp_path)


def test_plain_peft_model_for_lora_without_task_type():
    assert type(lora_mlp()) is pk.PeftModel
    gpt2, _ = make_model("gpt2")
    assert type(pk.get_peft_model(gpt2, pk.LoraConfig(task_type="CAUSAL_LM"))) is pk.PeftModelForCausalLM


def test_inject_adapter_in_model_returns_the_model():
    model = make_mlp()
    out = pk.inject_adapter_in_model(pk.LoraConfig(target_modules=["lin0"]), model)
    assert out is model and isinstance(model.lin0, Linear)


def test_gpt2_generate_and_compile():
    gpt2, _ = make_model("gpt2")
    model = pk.get_peft_model(gpt2, pk.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    inputs = make_inputs("gpt2")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    expected = logits_of(model(**inputs))
    compiled = torch.compile(model.base_model.model, fullgraph=False)
    assert_close(logits_of(compiled(**inputs)), expected, FP32_SAME_MATH, "torch.compile")
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, 32, requires_grad=True)
    compiled_layer = torch.compile(layer, fullgraph=True)
    y = compiled_layer(x)
    y.sum().backward()
    assert_close(y, layer(x), FP32_SAME_MATH, "fullgraph layer")
    assert layer.lora_A["default"].weight.grad is not None


@pytest.mark.oracle
def test_embedding_lora_same_as_peft(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base_ours, base_theirs = EmbMLP(), EmbMLP()
    base_theirs.load_state_dict(base_ours.state_dict())
    kwargs = dict(target_modules=["emb", "lin0"], r=4, lora_alpha=8, init_lora_weights=False)
    ours = pk.get_peft_model(base_ours, pk.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(base_theirs, peft.LoraConfig(**kwargs))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    ids = torch.randint(0, 100, (3, 7))
    assert_close(ours(ids), theirs(ids), FP32_SAME_MATH, "embedding LoRA vs peft")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    )
    torch.manual_seed(0)  # the same base weights as base_ours / base_theirs
    reloaded = peft.PeftModel.from_pretrained(EmbMLP(), tmp_path / "ours")
    assert_close(reloaded(ids), theirs(ids), FP32_SAME_MATH, "peft loads our embedding adapter")
