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
    # The int8 layer calls one of these (a dedicated int8 entry point, or the LoRA op with a weight scale).
    for name in ("lora_linear_int8_multi", "lora_linear_multi"):
        real = getattr(ops, name, None)
        if real is not None:

            def counting(*args, real=real, **kwargs):
                int8_calls.append(1)
                return real(*args, **kwargs)

            monkeypatch.setattr(ops, name, counting)
    got = logits_of(model(**inputs))
    assert len(int8_calls) == len(layers)
    # W8A16 vs bnb's LLM.int8 (activations quantized too): docs/PEFT_CONTRACT.md §7's softmax-space tolerance.
    assert_close(got.softmax(-1), want.softmax(-1), INT8_MERGE_SOFTMAX, "patched int8 vs PEFT+bnb")
    got.sum().backward()
    assert all(m.lora_A["default"].weight.grad is not None for m in layers)
    pk.unpatch_peft_model(model)
    assert all(type(m) is peft.tuners.lora.bnb.Linear8bitLt for m in lora_layers(model))


def test_patch_bnb_4bit(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_model("opt")[0].save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False))
    inputs = make_inputs("opt")
    want = logits_of(model(**inputs))
    pk.patch_peft_model(model)
    layers = lora_layers(model)
    assert layers and all(hf_peft.is_patched(m) and type(m).__name__ == "Linear4bit" for m in layers)
    calls = []
    real = ops.lora_linear_4bit_multi

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "lora_linear_4bit_multi", counting)
    got = logits_of(model(**inputs))
    assert len(calls) == len(layers)
    # Both decode bnb's weight bit for bit and compute in fp32: only the summation order differs.
    assert_close(got, want, FP32_SAME_MATH, "patched 4-bit vs PEFT+bnb")
    got.sum().backward()
    assert all(m.lora_A["default"].weight.grad is not None for m in layers)
    pk.unpatch_peft_model(model)
    assert all(type(m) is peft.tuners.lora.bnb.Linear4bit for m in lora_layers(model))


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


# ---------------------------------------------------------------------------- patch_peft() (issue #13)
@pytest.fixture
def patched():
    assert pk.patch_peft()
    yield
    pk.unpatch_peft()


def hook_points():
    """{(class, attribute): the __dict__ entry now} for every function patch_peft replaces."""
    from peft.tuners.lora.model import LoraModel
    from peft.tuners.tuners_utils import BaseTuner

    points = [(LoraModel, "_create_and_replace"), (BaseTuner, "inject_adapter")]
    points += [(peft.PeftModel, "_setup_prompt_encoder")]
    return {(owner, name): owner.__dict__[name] for owner, name in points}


def test_patch_peft_is_idempotent_thread_safe_and_unpatch_restores_the_originals():
    import threading

    originals = hook_points()
    barrier = threading.Barrier(8)
    results = []

    def patch():
        barrier.wait()
        results.append(pk.patch_peft())

    threads = [threading.Thread(target=patch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert results == [True] * 8
        for point, function in hook_points().items():
            assert function is not originals[point], f"{point} patched"
            assert function.__wrapped__ is originals[point], f"{point} wrapped exactly once"
        assert pk.patch_peft() and hook_points()[point] is function, "a second call changes nothing"
    finally:
        pk.unpatch_peft()
    assert hook_points() == originals and all(hook_points()[p] is f for p, f in originals.items())
    pk.unpatch_peft()  # idempotent
    assert hook_points() == originals


def test_patch_peft_outside_the_tested_peft_range_warns_once_and_patches_nothing(monkeypatch):
    from peft_kernels.integration import patch

    originals = hook_points()
    monkeypatch.setattr(peft, "__version__", "0.30.0")
    monkeypatch.setattr(patch, "_version_warned", False)
    with pytest.warns(UserWarning, match="peft 0.30.0 is installed, so nothing is patched"):
        assert pk.patch_peft() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pk.patch_peft() is False
    assert hook_points() == originals and not patch.is_peft_patched()


def framework_loads_model(base, config=None, adapter_dir=None):
    """What Axolotl's and LLaMA-Factory's model loaders do: import peft and call it themselves."""
    import peft as their_peft

    if adapter_dir is not None:
        return their_peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    return their_peft.get_peft_model(base, config)


def test_one_patch_peft_line_fuses_a_framework_that_calls_peft_itself(tmp_path, fused_calls):
    inputs = make_inputs("llama")
    plain = hf_lora("llama")
    plain.save_pretrained(tmp_path)
    want = logits_of(plain(**inputs))
    built_before = hf_lora("llama")

    pk.patch_peft()  # the one line
    try:
        trained = framework_loads_model(make_model("llama")[0], adapter_dir=tmp_path)
        fresh = framework_loads_model(make_model("llama")[0], config=peft.LoraConfig(task_type="CAUSAL_LM", r=4))
    finally:
        pk.unpatch_peft()
    for model in (trained, fresh):
        assert isinstance(model, peft.PeftModel)
        layers = lora_layers(model)
        assert layers and all(hf_peft.is_patched(m) for m in layers)
        assert all(isinstance(m, peft.tuners.lora.Linear) for m in layers)
    assert not any(hf_peft.is_patched(m) for m in built_before.modules()), "models built before stay PEFT's"
    fused_calls.clear()
    assert_close(logits_of(trained(**inputs)), want, FP32_SAME_MATH, "from_pretrained while patched")
    assert len(fused_calls) == len(lora_layers(trained))


def test_patch_peft_covers_the_adapter_and_injection_routes(patched, tmp_path):
    hf_lora("llama", seed=1).save_pretrained(tmp_path / "saved")
    model = hf_lora("llama")
    model.add_adapter("added", peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["k_proj"]))
    model.load_adapter(tmp_path / "saved", adapter_name="loaded")
    assert all(hf_peft.is_patched(m) for m in lora_layers(model))
    assert {"added", "loaded"} <= {a for m in lora_layers(model) for a in m.lora_A}

    # transformers' model.add_adapter / load_adapter call peft.inject_adapter_in_model (transformers 5.25 asks
    # for peft >= 0.22 before it gets there, so with the contract's 0.21.2 the peft call is exercised directly).
    base = peft.inject_adapter_in_model(
        peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), make_model("llama")[0]
    )
    layers = lora_layers(base)
    assert len(layers) == 4 and all(hf_peft.is_patched(m) for m in layers)


class ConvNet(torch.nn.Module):
    """A pointwise and a 3×3 Conv2d: both LoRA Conv2d paths (fused 1×1, eager k×k)."""

    def __init__(self):
        super().__init__()
        self.pointwise = torch.nn.Conv2d(3, 8, 1)
        self.conv = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.pointwise(x)))


@pytest.mark.parametrize("kind", ["conv1d_gpt2", "embedding", "conv2d"])
def test_patch_peft_layer_kinds_match_peft_and_save_identical_files(patched, tmp_path, kind):
    gen = torch.Generator().manual_seed(0)
    if kind == "conv2d":
        targets, inputs = ["pointwise", "conv"], {"x": torch.randn(2, 3, 5, 5, generator=gen)}

        def base():
            torch.manual_seed(0)
            return ConvNet()
    else:
        family = "gpt2" if kind == "conv1d_gpt2" else "llama"
        targets = ["c_attn"] if family == "gpt2" else ["embed_tokens", "q_proj"]
        inputs = make_inputs(family)

        def base():
            return make_model(family)[0]

    config = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    fused = peft.get_peft_model(base(), peft.LoraConfig(**config))
    pk.unpatch_peft()
    plain = peft.get_peft_model(base(), peft.LoraConfig(**config))
    plain.load_state_dict(fused.state_dict())
    assert lora_layers(fused) and all(hf_peft.is_patched(m) for m in lora_layers(fused))
    assert not any(hf_peft.is_patched(m) for m in plain.modules())
    want_out, want_grads = loss_and_grads(plain, inputs)
    out, grads = loss_and_grads(fused, inputs)
    assert_close(out, want_out, FP32_SAME_MATH, kind)
    for name, grad in want_grads.items():
        assert_close(grads[name], grad, FP32_SAME_MATH, name)

    fused.save_pretrained(tmp_path / "fused")
    plain.save_pretrained(tmp_path / "plain")
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "fused" / file).read_bytes() == (tmp_path / "plain" / file).read_bytes(), file
    assert list(fused.state_dict()) == list(plain.state_dict()), "same names, same order"


def test_patch_peft_logs_the_layers_it_does_not_fuse(patched, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="peft_kernels.integration.patch"):
        model = hf_lora("llama", use_dora=True, target_modules=["q_proj"])
    records = [r.getMessage() for r in caplog.records if "keep PEFT's forward" in r.getMessage()]
    assert len(records) == 1, records
    assert "model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj" in records[0]
    assert "DoraLinearVariant" in records[0]
    assert all(type(m) is peft.tuners.lora.Linear for m in lora_layers(model)), "DoRA keeps PEFT's class"


def test_patch_peft_prefix_tuning_runs_the_cache_path_with_peft_results(monkeypatch):
    from peft_kernels.tuners import prefix_cache_builder as prefix_cache

    built = []
    real = prefix_cache.build_prefix_cache
    monkeypatch.setattr(prefix_cache, "build_prefix_cache", lambda *a, **k: built.append(1) or real(*a, **k))
    inputs = make_inputs("llama")
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    plain = peft.get_peft_model(make_model("llama")[0], config)
    pk.patch_peft()
    try:
        fused = peft.get_peft_model(make_model("llama")[0], config)
    finally:
        pk.unpatch_peft()
    fused.load_state_dict(plain.state_dict())
    want, want_grads = loss_and_grads(plain.train(), inputs)
    assert not built, "a model built before patch_peft() keeps PEFT's path"
    got, grads = loss_and_grads(fused.train(), inputs)
    assert built, "peft_kernels' prefix cache built the past key/values (also after unpatch_peft())"
    pk.unpatch_peft_model(fused)
    built.clear()
    assert_close(logits_of(fused(**inputs)), want, FP32_SAME_MATH, "unpatch_peft_model")
    assert not built, "unpatch_peft_model gave the model PEFT's get_prompt back"
    pk.patch_peft_model(plain)
    assert_close(logits_of(plain(**inputs)), want, FP32_SAME_MATH, "patch_peft_model")
    assert built, "patch_peft_model gave a model built before patch_peft() the cache path"
    assert_close(got, want, FP32_SAME_MATH, "prefix logits")
    for name, grad in want_grads.items():
        assert_close(grads[name], grad, FP32_SAME_MATH, name)
