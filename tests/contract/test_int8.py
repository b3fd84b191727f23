"""docs/PEFT_CONTRACT.md §7 / issue #4: LoRA over int8 bases — bitsandbytes Linear8bitLt on CPU and our Int8Linear."""

import warnings

import pytest
import torch
from _models import logits_of, make_inputs, make_model
from _tolerances import FP32_SAME_MATH, INT8_MERGE_SOFTMAX, INT8_MIN_SQNR_DB, assert_close, sqnr_db

import peft_kernels as pk
from peft_kernels.layers.int8 import Int8Linear
from peft_kernels.layers.lora_int8 import Linear8bitLt

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("opt")
    make_model("opt")[0].save_pretrained(path)
    return path


def load_int8(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    assert model.is_loaded_in_8bit
    return model


def int8_lora(path, **kwargs):
    model = pk.prepare_model_for_kbit_training(load_int8(path), use_gradient_checkpointing=False)
    kwargs.setdefault("init_lora_weights", False)
    return pk.get_peft_model(model, pk.LoraConfig(task_type="CAUSAL_LM", r=4, **kwargs))


def test_bnb_layers_are_wrapped_and_match_dequantized_reference(opt_dir):
    model = int8_lora(opt_dir)
    layer = model.base_model.model.model.decoder.layers[0].self_attn.q_proj
    assert isinstance(layer, Linear8bitLt) and repr(layer).startswith("lora.Linear8bitLt(")
    assert isinstance(layer.get_base_layer(), bnb.nn.Linear8bitLt)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 7, 32)
    weight = layer.get_base_layer().weight
    w_deq = weight.CB.float() * weight.SCB.float()[:, None] / 127
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ w_deq.T + layer.get_base_layer().bias + layer.scaling["default"] * (x @ a.T @ b.T)
    assert_close(layer(x), expected, FP32_SAME_MATH, "W8A16 LoRA forward")


def test_int8_merge_disable_and_unload(opt_dir):
    model = int8_lora(opt_dir)
    model.eval()
    inputs = make_inputs("opt")
    with torch.no_grad():
        base = logits_of(load_int8(opt_dir)(**inputs))
        adapted = logits_of(model(**inputs))
        assert not torch.allclose(adapted, base)
        with pytest.warns(UserWarning, match="Merge lora module to 8-bit linear may get different generations"):
            model.merge_adapter()
        merged = logits_of(model(**inputs))
        with model.disable_adapter():
            disabled = logits_of(model(**inputs))
        assert_close(disabled.softmax(-1), base.softmax(-1), INT8_MERGE_SOFTMAX, "merged + disabled == base")
        model.unmerge_adapter()  # restored by disable_adapter's unmerge already: warns "Already unmerged"
        unloaded = model.merge_and_unload()
        assert isinstance(unloaded.model.decoder.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
        assert_close(logits_of(unloaded(**inputs)).softmax(-1), adapted.softmax(-1), INT8_MERGE_SOFTMAX, "unload")
        assert_close(merged.softmax(-1), adapted.softmax(-1), INT8_MERGE_SOFTMAX, "merged")


def test_int8_train_save_reload(opt_dir, tmp_path):
    model = int8_lora(opt_dir, lora_dropout=0.1, init_lora_weights=True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (4, 8))
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    model.eval()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = logits_of(model(input_ids=ids))
        reloaded = pk.PeftModel.from_pretrained(load_int8(opt_dir), tmp_path)
        assert torch.equal(logits_of(reloaded(input_ids=ids)), expected)


@pytest.mark.oracle
def test_int8_checkpoints_interchange_with_peft(opt_dir, tmp_path):
    peft = pytest.importorskip("peft")
    ours = int8_lora(opt_dir)
    theirs = peft.get_peft_model(
        peft.prepare_model_for_kbit_training(load_int8(opt_dir), use_gradient_checkpointing=False),
        peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False),
    )
    assert type(theirs.base_model.model.model.decoder.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    ours.save_pretrained(tmp_path / "ours")
    peft_loaded = peft.PeftModel.from_pretrained(load_int8(opt_dir), tmp_path / "ours")
    for name, param in theirs.named_parameters():
        if "lora_" in name:
            assert torch.equal(peft_loaded.get_parameter(name), param), name
    theirs.save_pretrained(tmp_path / "theirs")
    ours_loaded = pk.PeftModel.from_pretrained(load_int8(opt_dir), tmp_path / "theirs")
    for name, param in theirs.named_parameters():
        if "lora_" in name:
            assert torch.equal(ours_loaded.get_parameter(name), param), name
    # Outputs agree up to bitsandbytes' activation quantization (LLM.int8 vs our W8A16): softmax space.
    inputs = make_inputs("opt")
    with torch.no_grad():
        assert_close(
            logits_of(ours(**inputs)).softmax(-1),
            logits_of(theirs(**inputs)).float().softmax(-1),
            INT8_MERGE_SOFTMAX,
            "ours vs peft int8",
        )


def test_quantize_int8_format_sqnr_and_bytes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(431, 123).to(torch.bfloat16)
    int8 = Int8Linear.from_linear(linear)
    assert int8.weight.dtype == torch.int8 and int8.weight.abs().max() <= 127
    x = torch.randn(5, 431, dtype=torch.bfloat16)
    truth = x.float() @ linear.weight.float().T + linear.bias.float()
    assert sqnr_db(truth, int8(x).float()) >= INT8_MIN_SQNR_DB
    bf16_bytes = linear.weight.numel() * linear.weight.element_size()
    int8_bytes = int8.weight.numel() * int8.weight.element_size() + int8.weight_scale.numel() * 4
    assert int8_bytes <= 0.51 * bf16_bytes


def test_lora_over_quantize_int8_model_trains():
    base, _ = make_model("llama")
    pk.quantize_int8(base)
    assert isinstance(base.model.layers[0].self_attn.q_proj, Int8Linear)
    assert type(base.lm_head) is torch.nn.Linear
    model = pk.get_peft_model(base, pk.LoraConfig(task_type="CAUSAL_LM", r=4))
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, Linear8bitLt)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 100, (4, 8))
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    ref = logits_of(model(input_ids=ids))
    model.merge_adapter()
    merged = logits_of(model(input_ids=ids))
    assert_close(merged.softmax(-1), ref.softmax(-1), INT8_MERGE_SOFTMAX, "Int8Linear merge")
