"""Issue #18 item 1: the LoRA layer types of PEFT 0.21.2 beyond Linear/Embedding/Conv2d, against real peft.

nn.Conv1d and nn.Conv3d (one conv layer over d spatial dims), nn.MultiheadAttention (LoRA on in/out projections,
folded into the weights for the call), custom layer types registered with ``LoraConfig._register_custom_module``,
and the ValueError for a type neither supports. Each oracle row loads peft's adapter weights into ours (same
state-dict keys) and compares outputs, gradients, merge and unload.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _tolerances import FP32_SAME_MATH, MERGE, assert_close
from torch import nn

import peft_kernels as pk
from peft_kernels.layers.lora import Linear as PkLinear
from peft_kernels.layers.lora_conv import CONV_FORWARD_PATH, Conv1d, Conv2d, Conv3d
from peft_kernels.layers.lora_mha import MultiheadAttention

pytestmark = pytest.mark.usefixtures("one_thread_quiet")


class ConvNet(nn.Module):
    def __init__(self, conv_cls, **kwargs):
        super().__init__()
        self.conv = conv_cls(**kwargs)
        self.head = conv_cls(kwargs["out_channels"], 3, 3, padding=1)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)))


class AttnNet(nn.Module):
    def __init__(self, embed_dim=8, heads=2):
        super().__init__()
        self.mha = nn.MultiheadAttention(embed_dim, heads, batch_first=True)
        self.lin = nn.Linear(embed_dim, 4)

    def forward(self, x):
        return self.lin(self.mha(x, x, x)[0])


CONV_CASES = [
    ("conv1d_k3", nn.Conv1d, dict(in_channels=5, out_channels=6, kernel_size=3, padding=1), (2, 5, 9)),
    ("conv1d_pointwise", nn.Conv1d, dict(in_channels=5, out_channels=6, kernel_size=1), (2, 5, 7)),
    ("conv1d_stride2", nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=4, stride=2), (3, 4, 11)),
    ("conv3d_k3", nn.Conv3d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), (2, 3, 4, 5, 3)),
    ("conv3d_pointwise", nn.Conv3d, dict(in_channels=3, out_channels=4, kernel_size=1), (2, 3, 3, 4, 2)),
    (
        "conv3d_patch",
        nn.Conv3d,
        dict(in_channels=3, out_channels=4, kernel_size=(1, 2, 2), stride=(1, 2, 2)),
        (1, 3, 2, 4, 4),
    ),
]


def _peft():
    return pytest.importorskip("peft")


def _pair(model_fn, config_kwargs):
    """(peft model, ours) over identical bases, ours carrying peft's adapter weights."""
    peft = _peft()
    torch.manual_seed(0)
    base = model_fn().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs))
    ours = pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(**config_kwargs))
    theirs_sd = theirs.state_dict()
    ours_sd = ours.state_dict()
    assert set(ours_sd) == set(theirs_sd), "same parameter names"
    for key, value in theirs_sd.items():
        assert ours_sd[key].shape == value.shape, key
    ours.load_state_dict(theirs_sd)
    return theirs, ours


def _grads(model, x):
    model.zero_grad()
    out = model(x)
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.oracle
@pytest.mark.parametrize("name, conv_cls, conv_kwargs, shape", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv1d_conv3d_match_peft(name, conv_cls, conv_kwargs, shape):
    cfg = dict(target_modules=["conv", "head"], r=4, lora_alpha=8, init_lora_weights=False, lora_bias=True)
    theirs, ours = _pair(lambda: ConvNet(conv_cls, **conv_kwargs), cfg)
    lora_cls = {nn.Conv1d: Conv1d, nn.Conv3d: Conv3d}[conv_cls]
    assert isinstance(ours.base_model.model.conv, lora_cls)
    assert repr(ours.base_model.model.conv).startswith(f"lora.{lora_cls.__name__}(")
    for module in theirs.modules():
        if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
            nn.init.normal_(module.lora_B["default"].bias)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    out_t, grads_t = _grads(theirs, x)
    out_o, grads_o = _grads(ours, x)
    assert_close(out_o, out_t, FP32_SAME_MATH, f"{name} forward")
    assert grads_o.keys() == grads_t.keys()
    for key in grads_t:
        assert_close(grads_o[key], grads_t[key], FP32_SAME_MATH, f"{name} grad {key}")
    with torch.no_grad():
        ours.merge_adapter()
        assert_close(ours(x), out_t, MERGE, f"{name} merged")
        merged_o = ours.merge_and_unload()
        assert type(merged_o.conv) is conv_cls
        if name == "conv3d_pointwise":
            return  # PEFT 0.21.2's merge squeezes dims 2-3 of a 1x1x1 kernel and fails; ours merges (above)
        merged_t = theirs.merge_and_unload()
    assert_close(merged_o.conv.weight, merged_t.conv.weight, MERGE, f"{name} merged weight")


def test_conv_kernel_dims_checked_and_path_stated():
    with pytest.raises(ValueError, match="Conv1d layer kernel must have 3 dimensions, not 4"):
        Conv1d(nn.Conv2d(3, 4, 1), "default", r=2)
    assert isinstance(Conv2d(nn.Conv2d(3, 4, 1), "default", r=2), Conv2d)
    assert "pointwise" in CONV_FORWARD_PATH and "reference" in CONV_FORWARD_PATH


def test_pointwise_conv1d_conv3d_take_the_fused_op(monkeypatch):
    from peft_kernels import ops

    calls = []
    real = ops.lora_linear_multi
    monkeypatch.setattr(ops, "lora_linear_multi", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    for lora_cls, base, shape in (
        (Conv1d, nn.Conv1d(5, 6, 1), (2, 5, 7)),
        (Conv3d, nn.Conv3d(3, 4, 1), (2, 3, 3, 4, 2)),
    ):
        layer = lora_cls(base, "default", r=2, init_lora_weights=False)
        x = torch.randn(*shape)
        fast = layer(x)
        eager = layer.base_layer(x) + layer._eager_lora_update(x, "default")
        assert_close(fast, eager, FP32_SAME_MATH, lora_cls.__name__)
    assert calls == [(2 * 7, 5), (2 * 3 * 4 * 2, 3)]


@pytest.mark.oracle
def test_multihead_attention_matches_peft():
    cfg = dict(target_modules=["mha"], r=2, lora_alpha=4, init_lora_weights=False)
    theirs, ours = _pair(AttnNet, cfg)
    layer = ours.base_model.model.mha
    assert isinstance(layer, MultiheadAttention) and isinstance(layer.base_layer.out_proj, PkLinear)
    assert layer.embed_dim == 8 and layer.num_heads == 2 and layer.batch_first
    assert repr(layer).startswith("lora.MultiheadAttention(")
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    out_t, grads_t = _grads(theirs, x)
    out_o, grads_o = _grads(ours, x)
    assert_close(out_o, out_t, FP32_SAME_MATH, "mha forward")
    assert grads_o.keys() == grads_t.keys() and len(grads_t) == 4
    for key in grads_t:
        assert_close(grads_o[key], grads_t[key], FP32_SAME_MATH, f"mha grad {key}")
    # The forward leaves every Parameter registered and unchanged (PEFT swaps them out and back).
    assert set(ours.state_dict()) == set(theirs.state_dict())
    with torch.no_grad():
        with ours.disable_adapter(), theirs.disable_adapter():
            # PEFT re-subtracts ΔW after each call, so its weights drift by rounding; ours stay bitwise the base.
            assert_close(ours(x), theirs(x), FP32_SAME_MATH, "mha disabled")
        theirs.merge_adapter()
        ours.merge_adapter()
        assert_close(ours(x), theirs(x), MERGE, "mha merged")
        theirs.unmerge_adapter()
        ours.unmerge_adapter()
        assert_close(ours(x), out_t, MERGE, "mha unmerged")
        unloaded_t = theirs.merge_and_unload()
        unloaded_o = ours.merge_and_unload()
    assert type(unloaded_o.mha) is nn.MultiheadAttention and type(unloaded_o.mha.out_proj) is type(
        unloaded_t.mha.out_proj
    )
    for key, value in unloaded_t.state_dict().items():
        assert_close(unloaded_o.state_dict()[key], value, MERGE, f"unloaded {key}")


@pytest.mark.oracle
@pytest.mark.parametrize("autocast_adapter_dtype", [False, True])
def test_multihead_attention_adapter_dtype_follows_peft(autocast_adapter_dtype):
    """A 16-bit nn.MultiheadAttention (no ``weight`` attribute): without autocast the adapter takes the model's
    dtype, with it fp32, on in_proj and out_proj alike (PEFT reads out_proj's weight)."""
    dtypes = []
    for lib in (_peft(), pk):
        model = lib.get_peft_model(
            AttnNet().to(torch.float16),
            lib.LoraConfig(target_modules=["mha"]),
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
        dtypes.append(sorted((n, p.dtype) for n, p in model.named_parameters() if "lora_" in n))
    assert dtypes[1] == dtypes[0]
    assert {d for _, d in dtypes[1]} == {torch.float32 if autocast_adapter_dtype else torch.float16}


def test_multihead_attention_checkpoint_loads_both_ways(tmp_path):
    peft = _peft()
    cfg = dict(target_modules=["mha"], r=2, lora_alpha=4, init_lora_weights=False)
    theirs, _ = _pair(AttnNet, cfg)
    theirs.save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    base = AttnNet().eval()
    loaded = pk.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert_close(loaded(x), theirs(x), FP32_SAME_MATH, "peft -> ours")
        loaded.save_pretrained(tmp_path / "ours")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        assert_close(back(x), theirs(x), FP32_SAME_MATH, "ours -> peft")


def test_multihead_attention_refuses_mixed_batches_and_separate_qkv():
    model = pk.get_peft_model(AttnNet().eval(), pk.LoraConfig(target_modules=["mha"], r=2))
    with pytest.raises(TypeError, match="does not support mixed adapter batches"):
        model.base_model.model.mha(
            torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8), adapter_names=["default"]
        )
    net = nn.Sequential()
    net.add_module("mha", nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    with pytest.raises(ValueError, match="Only same"):
        pk.get_peft_model(net, pk.LoraConfig(target_modules=["mha"]))


# ------------------------------------------------------------------------------- custom modules, unsupported types
class Scale(nn.Module):
    """A layer type neither PEFT nor peft_kernels knows: y = x · w (elementwise)."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.in_features = self.out_features = n

    def forward(self, x):
        return x * self.weight


def test_custom_module_mapping_dispatches_registered_class():
    class LoraScale(PkLinear):  # our Linear's LoRA formula over the custom base's forward (eager path)
        def __init__(self, base_layer, adapter_name, config=None, **kwargs):
            self.received_config = config
            super().__init__(base_layer, adapter_name, **kwargs)

        def _lora_forward(self, x, active, args, kwargs):
            return self._eager_forward(x, active, args, kwargs)

    model = nn.Sequential(nn.Linear(4, 4), Scale(4))
    config = pk.LoraConfig(target_modules=["0", "1"], r=2, init_lora_weights=False)
    config._register_custom_module({Scale: LoraScale})
    peft_model = pk.get_peft_model(model, config)
    layer = peft_model.base_model.model[1]
    assert type(layer) is LoraScale and layer.received_config is config
    x = torch.randn(3, 4)
    hidden = peft_model.base_model.model[0](x)
    expected = hidden * layer.base_layer.weight + layer._eager_lora_update(hidden, "default")
    assert_close(peft_model(x), expected, FP32_SAME_MATH, "custom layer")


@pytest.mark.oracle
def test_custom_module_of_unknown_type_warns_like_peft():
    """A layer type PEFT does not know, made targetable by a registered custom LoRA class, warns once (PEFT's text)."""
    found = []
    for lib in (_peft(), pk):
        lora_layer = lib.tuners.lora.LoraLayer

        class CustomLora(nn.Module, lora_layer):  # does nothing; only the dispatch matters here
            def __init__(self, base_layer, adapter_name, _layer_cls=lora_layer, **kwargs):
                super().__init__()
                _layer_cls.__init__(self, base_layer)
                self._active_adapter = adapter_name

        config = lib.LoraConfig(target_modules=["0", "1"])
        config._register_custom_module({Scale: CustomLora})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lib.get_peft_model(nn.Sequential(nn.Linear(4, 4), Scale(4)), config)
        found.append([(w.category, str(w.message)) for w in caught if "Unsupported layer type" in str(w.message)])
    assert found[1] == found[0]
    assert found[1] == [(UserWarning, f"Unsupported layer type '{Scale}' encountered, proceed at your own risk.")]


@pytest.mark.oracle
def test_unsupported_type_raises_value_error_like_peft():
    peft = _peft()
    for lib in (peft, pk):
        model = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="is not supported"):
            lib.get_peft_model(model, lib.LoraConfig(target_modules=["0", "1"]))
        if lib is pk:  # ours fails before any replacement (all or nothing)
            assert type(model[0]) is nn.Linear
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.oracle
def test_multihead_attention_under_fsdp_matches_peft():
    """FSDP (use_orig_params, one CPU process) sets the unsharded weights as instance attributes in its forward:
    the LoRA'd weights must still be the ones the attention reads, as in PEFT (FSDP1 on CPU needs device_id)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    cfg = dict(target_modules=["mha"], r=2, lora_alpha=4, init_lora_weights=False)
    theirs, ours = _pair(AttnNet, cfg)
    order = [n for n, _ in ours.named_parameters()]
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = ours(x)
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = {
            name: FSDP(copy.deepcopy(model), use_orig_params=True, device_id=torch.device("cpu"))
            for name, model in (("theirs", theirs), ("ours", ours))
        }
        with torch.no_grad():
            out_t, out_o = wrapped["theirs"](x), wrapped["ours"](x)
    finally:
        dist.destroy_process_group()
    assert_close(out_t, plain, FP32_SAME_MATH, "peft under FSDP vs ours unwrapped")
    assert_close(out_o, out_t, FP32_SAME_MATH, "mha under FSDP")
    assert [n for n, _ in ours.named_parameters()] == order  # the forward left the Parameters as they were
