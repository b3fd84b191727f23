"""docs/PEFT_CONTRACT.md §6 for nn.Conv2d bases (issue #9): lora.Conv2d's parameters, forward, merge and dispatch.

PEFT 0.21.2 builds lora_A = Conv2d(C_in, r, kernel, stride, padding) and lora_B = Conv2d(r, C_out, 1×1,
groups=groups); the oracle rows check that names, shapes, repr, outputs, gradients and merges match. The
1×1 fast path (one fused linear op on (N·H·W, C) rows) is checked against the eager conv formula.
"""

from __future__ import annotations

import pytest
import torch
from _tolerances import EXACT, FP32_SAME_MATH, HALF_SAME_MATH, MERGE, assert_close
from safetensors.torch import load_file
from torch import nn

import peft_kernels as pk
from peft_kernels import ops
from peft_kernels.layers.lora_conv import Conv2d

# (name, Conv2d kwargs): the geometries of the README's vision/diffusion models.
GEOMETRIES = [
    ("pointwise", dict(in_channels=6, out_channels=5, kernel_size=1)),  # UNet proj_in/out, SegFormer head
    ("3x3_same", dict(in_channels=6, out_channels=5, kernel_size=3, padding=1)),  # UNet resnet conv1/conv2
    ("3x3_stride2", dict(in_channels=6, out_channels=5, kernel_size=3, stride=2, padding=1)),  # downsampler
    ("patchify", dict(in_channels=3, out_channels=8, kernel_size=4, stride=4)),  # ViT/Swin patch embedding
    ("rect_no_bias", dict(in_channels=6, out_channels=4, kernel_size=(3, 1), padding=(1, 0), bias=False)),
    ("pad_same_str", dict(in_channels=6, out_channels=5, kernel_size=3, padding="same")),
    ("grouped", dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=2)),  # r divisible by 2
]


# One torch thread and no warnings for every test of this file (the fixture lives in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread_quiet")


class Net(nn.Module):
    """One conv then a pointwise conv: two targets with different geometries."""

    def __init__(self, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(**conv_kwargs)
        self.head = nn.Conv2d(conv_kwargs["out_channels"], 3, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)))


def make_net(seed=0, **conv_kwargs) -> Net:
    torch.manual_seed(seed)
    return Net(**conv_kwargs).eval()


def image(channels: int, batch: int = 2, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def config(**extra):
    kwargs = dict(target_modules=["conv", "head"], r=4, lora_alpha=8, init_lora_weights=False)
    kwargs.update(extra)
    return kwargs


# ------------------------------------------------------------------------------------------- layer shape
def test_parameters_follow_peft_layout():
    base = nn.Conv2d(6, 5, kernel_size=3, stride=2, padding=1)
    layer = Conv2d(base, "default", r=4, lora_alpha=8)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    assert a.weight.shape == (4, 6, 3, 3) and a.stride == (2, 2) and a.padding == (1, 1) and a.bias is None
    assert b.weight.shape == (5, 4, 1, 1) and b.stride == (1, 1) and b.bias is None
    assert layer.scaling["default"] == 2.0
    assert (layer.in_features, layer.out_features) == (6, 5)
    assert torch.count_nonzero(b.weight) == 0  # B = 0 at init: an exact no-op
    x = image(6)
    assert_close(layer(x), base(x), EXACT, "init is a no-op")
    assert repr(layer).startswith("lora.Conv2d(")
    assert set(layer.state_dict()) == {
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.default.weight",
        "lora_B.default.weight",
    }


def test_dispatch_and_exports():
    model = pk.get_peft_model(make_net(**GEOMETRIES[1][1]), pk.LoraConfig(**config()))
    inner = model.base_model.model
    assert isinstance(inner.conv, Conv2d) and isinstance(inner.head, Conv2d)
    assert pk.tuners.lora.Conv2d is Conv2d
    from peft_kernels.tuners.lora.layer import Conv2d as shim_conv2d

    assert shim_conv2d is Conv2d


def test_rank_and_alpha_patterns_apply_to_convs():
    cfg = pk.LoraConfig(**config(rank_pattern={"head": 2}, alpha_pattern={"head": 6}))
    inner = pk.get_peft_model(make_net(**GEOMETRIES[1][1]), cfg).base_model.model
    assert inner.conv.lora_A["default"].weight.shape[0] == 4 and inner.conv.scaling["default"] == 2.0
    assert inner.head.lora_A["default"].weight.shape[0] == 2 and inner.head.scaling["default"] == 3.0


def test_groups_need_divisible_rank_and_refuse_merge():
    conv_kwargs = dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=4)
    with pytest.raises(ValueError, match="rank is divisible by groups"):
        pk.get_peft_model(make_net(**conv_kwargs), pk.LoraConfig(**config(r=6)))
    model = pk.get_peft_model(make_net(**conv_kwargs), pk.LoraConfig(**config(r=8)))
    assert model.base_model.model.conv.lora_B["default"].groups == 4
    with pytest.raises(NotImplementedError, match="groups > 1"):
        model.merge_adapter()


def test_lora_bias_without_base_bias_cannot_merge():
    conv_kwargs = dict(in_channels=6, out_channels=4, kernel_size=3, padding=1, bias=False)
    model = pk.get_peft_model(make_net(**conv_kwargs), pk.LoraConfig(**config(lora_bias=True)))
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        model.base_model.model.conv.merge()


def test_dilated_conv_gets_a_dilated_A_and_merges():
    # PEFT's A ignores the dilation and its forward fails on this layer (mismatched output sizes); ours runs.
    conv_kwargs = dict(in_channels=6, out_channels=5, kernel_size=3, padding=2, dilation=2)
    model = pk.get_peft_model(make_net(**conv_kwargs), pk.LoraConfig(**config()))
    x = image(6)
    with torch.no_grad():
        adapted = model(x)
        model.merge_adapter()
        merged = model(x)
    assert_close(merged, adapted, MERGE, "dilated merge")


# ------------------------------------------------------------------------------------------- 1x1 fast path
def _count_fused_calls(monkeypatch) -> list:
    calls = []
    real = ops.lora_linear_multi

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "lora_linear_multi", counting)
    return calls


def _pointwise_layer(bias=True, lora_bias=False, adapters=("default",)):
    torch.manual_seed(0)
    layer = Conv2d(nn.Conv2d(6, 5, 1, bias=bias), adapters[0], r=4, lora_alpha=8, init_lora_weights=False)
    for name in adapters[1:]:
        layer.update_layer(name, 2, 3, 0.0, False, lora_bias=lora_bias)
    layer.set_adapter(list(adapters))
    return layer


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("variant", ["plain", "no_bias", "two_adapters_lora_bias"])
def test_pointwise_fast_path_equals_conv_formula(variant, channels_last, monkeypatch):
    if variant == "plain":
        layer = _pointwise_layer()
    elif variant == "no_bias":
        layer = _pointwise_layer(bias=False)
    else:
        layer = _pointwise_layer(lora_bias=True, adapters=("default", "other"))
        nn.init.normal_(layer.lora_B["other"].bias)
    calls = _count_fused_calls(monkeypatch)
    x = image(6, batch=3, size=5).requires_grad_(True)
    x_in = x.to(memory_format=torch.channels_last) if channels_last else x
    fast = layer(x_in)
    assert calls == [(3 * 5 * 5, 6)], "one fused op call on (N·H·W, C) rows"
    assert fast.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    params = [p for p in layer.parameters() if p.requires_grad] + [layer.base_layer.weight]
    grads_fast = torch.autograd.grad(fast.pow(2).sum(), [x, *params])

    eager = layer.base_layer(x)
    for adapter in layer.active_adapters:
        eager = eager + layer._eager_lora_update(x, adapter)
    grads_eager = torch.autograd.grad(eager.pow(2).sum(), [x, *params])
    assert_close(fast, eager, FP32_SAME_MATH, "pointwise forward")
    for g_fast, g_eager in zip(grads_fast, grads_eager):
        assert_close(g_fast, g_eager, FP32_SAME_MATH, "pointwise grad")


def test_non_pointwise_geometries_run_eager(monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    for _, conv_kwargs in GEOMETRIES[1:]:
        layer = Conv2d(nn.Conv2d(**conv_kwargs), "default", r=4, init_lora_weights=False)
        layer(image(conv_kwargs["in_channels"]))
    layer = _pointwise_layer()
    layer(image(6)[0])  # an unbatched (C, H, W) input: conv2d accepts it, the eager path handles it
    assert calls == []


def test_info_states_the_conv_forward_route(capsys):
    """#18: ``peft-kernels info`` says which convolutions take the fused op and which the reference path."""
    from peft_kernels.cli import main

    assert main(["info"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("conv LoRA forward: ")]
    assert len(lines) == 1
    assert "pointwise" in lines[0] and "fused" in lines[0] and "reference" in lines[0]


def test_pointwise_dropout_trains_and_eval_is_deterministic():
    torch.manual_seed(0)
    layer = Conv2d(nn.Conv2d(6, 5, 1), "default", r=4, lora_dropout=0.5, init_lora_weights=False)
    x = image(6)
    layer.train()
    out = layer(x)
    out.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None
    layer.eval()
    with torch.no_grad():
        expected = layer.base_layer(x) + layer._eager_lora_update(x, "default")
        assert_close(layer(x), expected, FP32_SAME_MATH, "eval: no dropout")


def test_pointwise_under_cpu_bf16_autocast():
    layer = _pointwise_layer()
    x = image(6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = layer(x)
        eager = layer.base_layer(x) + layer._eager_lora_update(x, "default")
    assert fast.dtype == eager.dtype == torch.bfloat16
    assert_close(fast.float(), eager.float(), HALF_SAME_MATH[torch.bfloat16], "bf16 autocast")


def test_mixed_batch_on_convs():
    model = pk.get_peft_model(make_net(**GEOMETRIES[1][1]), pk.LoraConfig(**config()))
    model.add_adapter("other", pk.LoraConfig(**config(r=2)))
    model.eval()
    x = image(6, batch=3)
    with torch.no_grad():
        mixed = model(x, adapter_names=["default", "__base__", "other"])
        with model.disable_adapter():
            base = model(x)
        default = model(x)
        model.set_adapter("other")
        other = model(x)
    assert_close(mixed[0], default[0], FP32_SAME_MATH, "row 0: default")
    assert_close(mixed[1], base[1], FP32_SAME_MATH, "row 1: base")
    assert_close(mixed[2], other[2], FP32_SAME_MATH, "row 2: other")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_unload(dtype):
    net = make_net(**GEOMETRIES[2][1]).to(dtype)
    model = pk.get_peft_model(net, pk.LoraConfig(**config(lora_bias=True)))
    for module in model.modules():
        if isinstance(module, Conv2d):
            nn.init.normal_(module.lora_B["default"].bias)
    x = image(6).to(dtype)
    tol = MERGE if dtype == torch.float32 else HALF_SAME_MATH[dtype]
    with torch.no_grad():
        adapted = model(x)
        model.merge_adapter(safe_merge=True)
        assert_close(model(x), adapted, tol, "merged")
        model.unmerge_adapter()
        assert_close(model(x), adapted, tol, "unmerged")
        unloaded = model.merge_and_unload()
        assert type(unloaded.conv) is nn.Conv2d
        assert_close(unloaded(x), adapted, tol, "merge_and_unload")


# ------------------------------------------------------------------------------------------- PEFT oracle
@pytest.mark.oracle
@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("name,conv_kwargs", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_conv2d_same_as_peft(name, conv_kwargs, lora_bias, tmp_path):
    peft = pytest.importorskip("peft")
    if lora_bias and conv_kwargs.get("bias") is False:
        pytest.skip("lora_bias needs a base bias to merge")
    cfg = config(lora_bias=lora_bias, lora_dropout=0.0)
    ours = pk.get_peft_model(make_net(**conv_kwargs), pk.LoraConfig(**cfg))
    theirs = peft.get_peft_model(make_net(**conv_kwargs), peft.LoraConfig(**cfg))
    assert repr(ours.base_model.model) == repr(theirs.base_model.model)
    sd_theirs = theirs.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in sd_theirs.items()}
    ours.load_state_dict(sd_theirs)

    x = image(conv_kwargs["in_channels"])
    out_ours, out_theirs = ours(x), theirs(x)
    assert_close(out_ours, out_theirs, FP32_SAME_MATH, "output vs peft")
    out_ours.pow(2).mean().backward()
    out_theirs.pow(2).mean().backward()
    grads_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    grads_ours = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert set(grads_ours) == set(grads_theirs)
    for key, grad in grads_ours.items():
        assert_close(grad, grads_theirs[key], FP32_SAME_MATH, f"grad {key}")

    if conv_kwargs.get("groups", 1) == 1:
        for key in ("conv", "head"):
            delta_ours = getattr(ours.base_model.model, key).get_delta_weight("default")
            delta_theirs = getattr(theirs.base_model.model, key).get_delta_weight("default")
            assert_close(delta_ours, delta_theirs, FP32_SAME_MATH, f"delta weight {key}")
        with torch.no_grad():
            ours.merge_adapter()
            theirs.merge_adapter()
            assert_close(ours(x), theirs(x), MERGE, "merged vs peft merged")
            ours.unmerge_adapter()
            theirs.unmerge_adapter()

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    sd_ours, sd_theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert set(sd_ours) == set(sd_theirs)
    for key, tensor in sd_ours.items():
        assert torch.equal(tensor, sd_theirs[key]), key
    with torch.no_grad():
        expected = theirs(x)
        peft_loads_ours = peft.PeftModel.from_pretrained(make_net(**conv_kwargs), tmp_path / "ours")
        assert_close(peft_loads_ours(x), expected, FP32_SAME_MATH, "peft loads ours")
        ours_loads_peft = pk.PeftModel.from_pretrained(make_net(**conv_kwargs), tmp_path / "theirs")
        assert_close(ours_loads_peft(x), expected, FP32_SAME_MATH, "ours loads peft")
