"""Issue #14: LoRA over bitsandbytes 4-bit bases (QLoRA) on CPU — tiny OPT and Llama loaded in 4-bit, against
PEFT 0.21.2 on the same weights: outputs, LoRA gradients, training, merge, checkpoints both ways, bnb's CPU repack.
"""

import warnings

import pytest
import torch
from _models import logits_of, make_inputs, make_model
from _tolerances import FP32_SAME_MATH, QLORA_MERGE_SOFTMAX, QLORA_REPACK, assert_close

import peft_kernels as pk
from peft_kernels.layers.lora_4bit import Linear4bit

bnb = pytest.importorskip("bitsandbytes")

# (family, quant_type, double quantization, quant_storage): both formats, nested or not, uint8 and bf16 storage.
FORMATS = {
    "opt-nf4-nested": ("opt", "nf4", True, torch.uint8),
    "llama-fp4-bf16storage": ("llama", "fp4", False, torch.bfloat16),
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for family in ("opt", "llama"):
        dirs[family] = tmp_path_factory.mktemp(family)
        make_model(family)[0].save_pretrained(dirs[family])
    return dirs


def load_4bit(path, quant_type, nested, storage):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=nested,
        bnb_4bit_quant_storage=storage,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    assert model.is_loaded_in_4bit
    return model


def make_pair(model_dirs, fmt, lib, **kwargs):
    family, quant_type, nested, storage = FORMATS[fmt]
    model = lib.prepare_model_for_kbit_training(
        load_4bit(model_dirs[family], quant_type, nested, storage), use_gradient_checkpointing=False
    )
    kwargs.setdefault("init_lora_weights", False)
    torch.manual_seed(0)
    return lib.get_peft_model(model, lib.LoraConfig(task_type="CAUSAL_LM", r=4, **kwargs)), family


def _attn(model, family):
    inner = model.base_model.model.model
    return inner.decoder.layers[0].self_attn if family == "opt" else inner.layers[0].self_attn


@pytest.mark.oracle
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_outputs_and_lora_gradients_equal_peft(model_dirs, fmt):
    peft = pytest.importorskip("peft")
    ours, family = make_pair(model_dirs, fmt, pk)
    theirs, _ = make_pair(model_dirs, fmt, peft)
    layer = _attn(ours, family).q_proj
    assert isinstance(layer, Linear4bit) and repr(layer).startswith("lora.Linear4bit(")
    assert type(_attn(theirs, family).q_proj).__name__ == "Linear4bit"
    assert layer.lora_A["default"].weight.dtype == _attn(theirs, family).q_proj.lora_A["default"].weight.dtype
    # bnb's Linear4bit saves its quant state under weight.* keys but does not load them (strict load fails on
    # both libraries alike): the adapters are what is copied.
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if "lora_" in k}, strict=False)
    inputs = make_inputs(family)
    ours.eval(), theirs.eval()  # the models' own dropout off; gradients still flow
    out_ours, out_theirs = ours(**inputs, labels=inputs["input_ids"]), theirs(**inputs, labels=inputs["input_ids"])
    assert_close(logits_of(out_ours), logits_of(out_theirs), FP32_SAME_MATH, "logits")
    out_ours.loss.backward()
    out_theirs.loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert_close(param.grad, grads[name], FP32_SAME_MATH, name)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_training_lowers_the_loss_and_checkpoint_reloads(model_dirs, fmt, tmp_path):
    model, family = make_pair(model_dirs, fmt, pk, lora_dropout=0.1, init_lora_weights=True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (4, 8))
    losses = []
    for _ in range(10):
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
        _, quant_type, nested, storage = FORMATS[fmt]
        reloaded = pk.PeftModel.from_pretrained(load_4bit(model_dirs[family], quant_type, nested, storage), tmp_path)
        assert torch.equal(logits_of(reloaded(input_ids=ids)), expected)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_merge_unmerge_and_unload(model_dirs, fmt):
    model, family = make_pair(model_dirs, fmt, pk)
    model.eval()
    inputs = make_inputs(family)
    _, quant_type, nested, storage = FORMATS[fmt]
    with torch.no_grad():
        adapted = logits_of(model(**inputs))
        with pytest.warns(UserWarning, match="Merge lora module to 4-bit linear may get different generations"):
            model.merge_adapter()
        merged = logits_of(model(**inputs))
        assert_close(merged.softmax(-1), adapted.softmax(-1), QLORA_MERGE_SOFTMAX, "merged")
        with pytest.warns(UserWarning, match="Unmerge lora module to 4-bit linear"):
            model.unmerge_adapter()
        assert_close(logits_of(model(**inputs)).softmax(-1), adapted.softmax(-1), QLORA_MERGE_SOFTMAX, "unmerged")
        base = _attn(model, family).q_proj.get_base_layer()
        assert base.weight.quant_state.quant_type == quant_type and base.weight.quant_state.nested == nested
        assert base.weight.dtype == storage
        unloaded = model.merge_and_unload()
        attn = unloaded.model.decoder.layers[0].self_attn if family == "opt" else unloaded.model.layers[0].self_attn
        assert type(attn.q_proj) is bnb.nn.Linear4bit
        assert_close(logits_of(unloaded(**inputs)).softmax(-1), adapted.softmax(-1), QLORA_MERGE_SOFTMAX, "unload")


def test_safe_merge_refuses_nan_and_leaves_the_weight(model_dirs):
    model, family = make_pair(model_dirs, "opt-nf4-nested", pk)
    layer = _attn(model, family).q_proj
    packed_before = layer.get_base_layer().weight.data.clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight.data, packed_before) and not layer.merged


@pytest.mark.oracle
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_checkpoints_interchange_with_peft(model_dirs, fmt, tmp_path):
    peft = pytest.importorskip("peft")
    ours, family = make_pair(model_dirs, fmt, pk)
    theirs, _ = make_pair(model_dirs, fmt, peft)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    family, quant_type, nested, storage = FORMATS[fmt]
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    peft_loaded = peft.PeftModel.from_pretrained(load_4bit(model_dirs[family], quant_type, nested, storage),
                                                 tmp_path / "ours")  # fmt: skip
    ours_loaded = pk.PeftModel.from_pretrained(load_4bit(model_dirs[family], quant_type, nested, storage),
                                               tmp_path / "theirs")  # fmt: skip
    for name, param in ours.named_parameters():
        if "lora_" in name:
            assert torch.equal(peft_loaded.get_parameter(name), param), name
    for name, param in theirs.named_parameters():
        if "lora_" in name:
            assert torch.equal(ours_loaded.get_parameter(name), param), name
    inputs = make_inputs(family)
    with torch.no_grad():
        ours_loaded.eval(), theirs.eval()
        assert_close(logits_of(ours_loaded(**inputs)), logits_of(theirs(**inputs)), FP32_SAME_MATH, "reloaded")


def test_bnb_cpu_repacked_layout_is_read():
    """bnb repacks a Linear4bit's weight on its first no-grad eval forward (AVX512-BF16 CPUs); the LoRA layer
    unpacks that layout to the same codes (exactly) and scales (rounded to bf16 by bnb) and gives the same output.

    (bnb 0.50.2's own forward on the repacked layout is not the reference here: on this CPU it differs from the
    dequantized product by O(1), max 2.8 at 128 -> 64.)
    """
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    codes = base.weight.data.clone()
    layer = Linear4bit(base, "default", r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(3, 128)
    with torch.no_grad():
        before = layer(x)
    base.eval()
    base.support_avx512bf16_for_cpu = True  # force the repack whatever this CPU has: its layout is what we read
    with torch.no_grad():
        base(x)
    if not getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this bitsandbytes build did not repack (no CPU kernel for the packed layout)")
    assert not torch.equal(base.weight.data.reshape(-1), codes.reshape(-1))  # the layout did change
    assert torch.equal(layer.quant_weight().packed.reshape(-1), codes.reshape(-1))
    with torch.no_grad():
        layer.eval()
        assert_close(layer(x), before, QLORA_REPACK, "repacked layout vs the standard one")


def test_layer_operand_cache_follows_a_new_base_weight():
    """The layer caches its 4-bit operands per weight: a base weight replaced after a forward (a reload, another
    quantization) is what the next forward reads, and the output is the new weight's product (bnb's dequantize)."""
    torch.manual_seed(5)
    base = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    layer = Linear4bit(base, "default", r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(3, 128)
    with torch.no_grad():
        layer(x)  # fills the cache with the first weight
        new_weight = torch.randn(64, 128)
        base.weight = bnb.nn.Params4bit(new_weight, requires_grad=False, quant_type="nf4").to("cpu")
        got = layer(x)
        w_deq = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
        lora = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        expected = x.double() @ (w_deq.double() + lora.double()).t()
    assert_close(got, expected.float(), FP32_SAME_MATH, "output after the base weight was replaced")


@pytest.mark.oracle
def test_patch_peft_covers_peft_built_4bit_models(model_dirs):
    """After ``patch_peft()``, a QLoRA model built by plain peft runs our 4-bit op, with peft's outputs."""
    import peft

    from peft_kernels import ops

    expected_model, family = make_pair(model_dirs, "opt-nf4-nested", peft)
    inputs = make_inputs(family)
    with torch.no_grad():
        expected = logits_of(expected_model(**inputs))
    assert pk.patch_peft()
    try:
        model, _ = make_pair(model_dirs, "opt-nf4-nested", peft)  # same seed: the same adapter weights
    finally:
        pk.unpatch_peft()
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(isinstance(m, peft.tuners.lora.LoraLayer) for m in layers)
    calls = []
    real = ops.lora_linear_4bit_multi
    ops.lora_linear_4bit_multi = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with torch.no_grad():
            got = logits_of(model(**inputs))
    finally:
        ops.lora_linear_4bit_multi = real
    assert len(calls) == len(layers)
    assert_close(got, expected, FP32_SAME_MATH, "patch_peft() 4-bit vs PEFT+bnb")
