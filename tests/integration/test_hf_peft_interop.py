"""Issue #8 part 1: PEFT models on the fused path (patch/unpatch in place) and PeftModel ↔ peft.PeftModel."""

import warnings

import pytest
import torch
from _models import logits_of, make_inputs, make_model
from _tolerances import EXACT, FP32_SAME_MATH, INT8_MERGE_SOFTMAX, MERGE, assert_close

import peft_kernels as pk
from peft_kernels import ops
from peft_kernels.integration import hf_peft

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.oracle


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of ops.lora_linear_multi (the LoRA layers call it by attribute)."""
    calls = []
    real = ops.lora_linear_multi

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "lora_linear_multi", counting)
    return calls


def hf_lora(family, seed=0, **kwargs):
    model, task = make_model(family, seed=seed)
    kwargs = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kwargs}
    return peft.get_peft_model(model, peft.LoraConfig(task_type=task, **kwargs))


def pk_lora(family, **kwargs):
    model, task = make_model(family)
    kwargs = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kwargs}
    return pk.get_peft_model(model, pk.LoraConfig(task_type=task, **kwargs))


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def loss_and_grads(model, inputs):
    """(logits, {trainable name: grad}) of sum(logits); grads are cleared afterwards."""
    logits = logits_of(model(**inputs))
    logits.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # Conv1D and nn.Linear bases
def test_patch_in_place_matches_peft_and_keeps_the_optimizer(family, fused_calls):
    inputs = make_inputs(family)
    patched, reference = hf_lora(family), hf_lora(family)
    params = dict(patched.named_parameters())
    # Built before patching: it must keep optimizing the model afterwards.
    opt = torch.optim.SGD([p for p in patched.parameters() if p.requires_grad], lr=0.1)
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1)
    want_logits, want_grads = loss_and_grads(reference, inputs)

    assert pk.patch_peft_model(patched) is patched
    layers = lora_layers(patched)
    assert layers and all(hf_peft.is_patched(m) for m in layers)
    assert all(repr(m).startswith("lora.Linear(") for m in layers)
    assert all(p is params[n] for n, p in patched.named_parameters()), "patching must keep every Parameter"
    logits, grads = loss_and_grads(patched, inputs)
    assert len(fused_calls) == len(layers), "one fused op call per LoRA layer"
    assert_close(logits, want_logits, FP32_SAME_MATH, "logits")
    for name, grad in want_grads.items():
        assert_close(grads[name], grad, FP32_SAME_MATH, name)

    for model, optimizer in ((patched, opt), (reference, ref_opt)):
        logits_of(model(**inputs)).sum().backward()
        optimizer.step()
    for name, param in reference.named_parameters():
        assert_close(params[name].detach(), param.detach(), FP32_SAME_MATH, f"after one step: {name}")

    assert pk.unpatch_peft_model(patched) is patched
    assert not any(hf_peft.is_patched(m) for m in patched.modules())
    assert all(type(m) is peft.tuners.lora.Linear for m in lora_layers(patched))
    assert_close(logits_of(patched(**inputs)), logits_of(reference(**inputs)), FP32_SAME_MATH, "unpatched")


def test_patched_model_keeps_peft_model_api(tmp_path):
    inputs = make_inputs("gpt2")
    model = pk.patch_peft_model(hf_lora("gpt2"))
    base = hf_lora("gpt2")
    with base.disable_adapter():
        want_base = logits_of(base(**inputs))
    adapted = logits_of(model(**inputs))

    with model.disable_adapter():
        assert_close(logits_of(model(**inputs)), want_base, EXACT, "disable_adapter")
    model.add_adapter("other", peft.LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False))
    assert all(hf_peft.is_patched(m) and set(m.lora_A) == {"default", "other"} for m in lora_layers(model))
    model.set_adapter("other")
    assert not torch.allclose(logits_of(model(**inputs)), adapted)
    model.set_adapter("default")
    assert_close(logits_of(model(**inputs)), adapted, EXACT, "set_adapter back")

    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(make_model("gpt2")[0], tmp_path)
    assert_close(logits_of(reloaded(**inputs)), adapted, FP32_SAME_MATH, "saved by the patched model")

    model.merge_adapter()
    assert_close(logits_of(model(**inputs)), adapted, MERGE, "merged")
    model.unmerge_adapter()
    unloaded = model.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in unloaded.modules())
    assert_close(logits_of(unloaded(**inputs)), adapted, MERGE, "merge_and_unload")


def test_lora_variants_keep_peft_forward():
    model = pk.patch_peft_model(hf_lora("llama"))
    with pytest.warns(UserWarning, match="does not fuse"):
        model.add_adapter("dora", peft.LoraConfig(task_type="CAUSAL_LM", r=2, use_dora=True))
    assert not any(hf_peft.is_patched(m) for m in lora_layers(model)), "DoRA layers went back to PEFT's class"

    with pytest.warns(UserWarning, match="keep PEFT's forward"):
        pk.patch_peft_model(hf_lora("llama", use_dora=True))


def test_patch_bnb_int8(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_model("opt")[0].save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False))
    inputs = make_inputs("opt")
    want = logits_of(model(**inputs))
    pk.patch_peft_model(model)
    layers = lora_layers(model)
    assert all(hf_peft.is_patched(m) and type(m).__name__ == "Linear8bitLt" for m in layers)
    int8_calls = []
    real = ops.lora_linear_int8_multi

    def counting(*args, **kwargs):
        int8_calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "lora_linear_int8_multi", counting)
    got = logits_of(model(**inputs))
    assert len(int8_calls) == len(layers)
    # W8A16 vs bnb's LLM.int8 (activations quantized too): docs/PEFT_CONTRACT.md §7's softmax-space tolerance.
    assert_close(got.softmax(-1), want.softmax(-1), INT8_MERGE_SOFTMAX, "patched int8 vs PEFT+bnb")
    got.sum().backward()
    assert all(m.lora_A["default"].weight.grad is not None for m in layers)
    pk.unpatch_peft_model(model)
    assert all(type(m) is peft.tuners.lora.bnb.Linear8bitLt for m in lora_layers(model))


@pytest.mark.parametrize("family", ["gpt2", "bert"])  # CAUSAL_LM; SEQ_CLS with its modules_to_save head
def test_convert_both_ways_shares_parameters(family):
    inputs = make_inputs(family)
    model = pk_lora(family, lora_dropout=0.1)
    model.add_adapter("second", pk.LoraConfig(task_type=make_model(family)[1], r=2, init_lora_weights=False))
    model.train()
    params = {n: p for n, p in model.named_parameters()}
    requires_grad = {n: p.requires_grad for n, p in params.items()}
    configs = {a: c.to_dict() for a, c in model.peft_config.items()}
    model.eval()
    want_logits, want_grads = loss_and_grads(model, inputs)
    task_class = type(model).__name__

    hf = pk.to_hf_peft(model)
    assert isinstance(hf, peft.PeftModel) and type(hf).__name__ == task_class
    assert not any(hf_peft.is_patched(m) for m in hf.modules())
    assert {n: p for n, p in hf.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in hf.named_parameters()), "the same Parameter objects"
    assert {n: p.requires_grad for n, p in hf.named_parameters()} == requires_grad
    for name, cfg in hf.peft_config.items():
        got = {k: v for k, v in cfg.to_dict().items() if k in configs[name] and k != "peft_version"}
        want = {k: v for k, v in configs[name].items() if k in got}
        assert got == want, name
    logits, grads = loss_and_grads(hf, inputs)
    assert_close(logits, want_logits, FP32_SAME_MATH, "to_hf_peft logits")
    for name, grad in want_grads.items():
        assert_close(grads[name], grad, FP32_SAME_MATH, name)

    back = pk.from_hf_peft(hf)
    assert isinstance(back, pk.PeftModel) and type(back).__name__ == task_class
    assert all(p is params[n] for n, p in back.named_parameters())
    assert {n: p.requires_grad for n, p in back.named_parameters()} == requires_grad
    assert {a: c.to_dict() for a, c in back.peft_config.items()} == configs
    logits, grads = loss_and_grads(back, inputs)
    assert_close(logits, want_logits, FP32_SAME_MATH, "from_hf_peft logits")
    for name, grad in want_grads.items():
        assert_close(grads[name], grad, FP32_SAME_MATH, name)


def test_convert_keeps_active_merged_and_patches_on_request(fused_calls):
    inputs = make_inputs("llama")
    model = pk_lora("llama")
    model.add_adapter("second", pk.LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False))
    model.set_adapter("second")
    want = logits_of(model(**inputs))
    model.merge_adapter()

    hf = pk.to_hf_peft(model, patch=True)
    assert hf.active_adapter == "second"
    layers = lora_layers(hf)
    assert all(hf_peft.is_patched(m) and m.merged_adapters == ["second"] for m in layers)
    assert_close(logits_of(hf(**inputs)), want, MERGE, "merged, converted")
    hf.unmerge_adapter()
    fused_calls.clear()
    assert_close(logits_of(hf(**inputs)), want, MERGE, "unmerged after conversion")
    assert len(fused_calls) == len(layers)

    back = pk.from_hf_peft(hf)
    assert back.active_adapter == "second"
    assert_close(logits_of(back(**inputs)), want, MERGE, "back")


def test_convert_refuses_what_the_other_side_lacks():
    dora = hf_lora("llama", use_dora=True)
    before = dict(dora.named_modules())
    with pytest.raises(NotImplementedError, match="variant"):
        pk.from_hf_peft(dora)
    assert dict(dora.named_modules()).keys() == before.keys(), "refused before touching the model"
    assert all(dora.get_submodule(n) is m for n, m in before.items())

    prefix = pk.get_peft_model(
        make_model("gpt2")[0], pk.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    with pytest.raises(NotImplementedError, match="Only LoRA"):
        pk.to_hf_peft(prefix)
    with pytest.raises(TypeError):
        pk.to_hf_peft(hf_lora("gpt2"))
    with pytest.raises(TypeError):
        pk.from_hf_peft(pk_lora("gpt2"))
