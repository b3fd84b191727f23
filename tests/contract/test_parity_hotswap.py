"""Issue #18 item 3: ``peft_kernels.utils.hotswap`` — swapping a loaded adapter's weights in place, eager and under
``torch.compile``, with no recompilation after ``prepare_model_for_compiled_hotswap``; against real peft."""

from __future__ import annotations

import copy

import pytest
import torch
from _tolerances import FP32_SAME_MATH, assert_close
from torch import nn

import peft_kernels as pk
from peft_kernels.utils.hotswap import (
    check_hotswap_configs_compatible,
    hotswap_adapter,
    prepare_model_for_compiled_hotswap,
)

pytestmark = pytest.mark.usefixtures("one_thread_quiet")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(6, 8)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.lin1 = nn.Linear(8 + 4 * 9, 3)

    def forward(self, x):
        h = torch.relu(self.lin0(x[:, :6]))
        img = torch.tanh(self.conv(x[:, 6:24].reshape(-1, 2, 3, 3)))
        return self.lin1(torch.cat([h, img.flatten(1)], dim=1))


def _base():
    torch.manual_seed(0)
    return Net().eval()


def _save_adapter(path, seed, **config):
    torch.manual_seed(seed)
    kwargs = dict(target_modules=["lin0", "conv", "lin1"], init_lora_weights=False) | config
    pk.get_peft_model(_base(), pk.LoraConfig(**kwargs)).save_pretrained(path)
    return path


def _x():
    return torch.randn(5, 24, generator=torch.Generator().manual_seed(3))


def _reference_output(path):
    with torch.no_grad():
        return pk.PeftModel.from_pretrained(_base(), path)(_x())


def test_eager_hotswap_equals_fresh_load(tmp_path):
    first = _save_adapter(tmp_path / "a0", seed=1, r=4, lora_alpha=8)
    second = _save_adapter(tmp_path / "a1", seed=2, r=4, lora_alpha=8)
    model = pk.PeftModel.from_pretrained(_base(), first)
    params_before = {n: p for n, p in model.named_parameters()}
    hotswap_adapter(model, str(second), adapter_name="default", torch_device="cpu")
    assert all(p is params_before[n] for n, p in model.named_parameters()), "same Parameters, swapped in place"
    with torch.no_grad():
        assert_close(model(_x()), _reference_output(second), FP32_SAME_MATH, "swapped")


@pytest.mark.oracle
def test_hotswap_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    first = _save_adapter(tmp_path / "a0", seed=1, r=4, lora_alpha=8)
    second = _save_adapter(tmp_path / "a1", seed=2, r=4, lora_alpha=8)
    theirs = peft.PeftModel.from_pretrained(_base(), first)
    ours = pk.PeftModel.from_pretrained(_base(), first)
    peft_hotswap(theirs, str(second), adapter_name="default", torch_device="cpu")
    hotswap_adapter(ours, str(second), adapter_name="default", torch_device="cpu")
    with torch.no_grad():
        assert_close(ours(_x()), theirs(_x()), FP32_SAME_MATH, "swapped")
    assert set(ours.state_dict()) == set(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], value, FP32_SAME_MATH, key)


@pytest.mark.oracle
def test_prepare_pads_ranks_and_tensor_scalings_like_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap as peft_prepare

    first = _save_adapter(tmp_path / "a0", seed=1, r=2, lora_alpha=4)
    theirs = peft.PeftModel.from_pretrained(_base(), first)
    ours = pk.PeftModel.from_pretrained(_base(), first)
    config = copy.deepcopy(ours.peft_config["default"])
    peft_prepare(theirs, target_rank=6)
    prepare_model_for_compiled_hotswap(ours, target_rank=6, config=config)
    assert config.r == 6
    for key, value in theirs.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key
        assert_close(ours.state_dict()[key], value, FP32_SAME_MATH, key)
    layer = ours.base_model.model.lin0
    assert isinstance(layer.scaling["default"], torch.Tensor) and layer.scaling["default"].item() == 2.0
    with torch.no_grad():
        assert_close(ours(_x()), _reference_output(first), FP32_SAME_MATH, "padding leaves the output unchanged")


def test_compiled_hotswap_without_recompilation(tmp_path):
    from torch._dynamo.testing import CompileCounter

    ranks_alphas = [(2, 4), (6, 3), (4, 16)]
    paths = [_save_adapter(tmp_path / f"a{i}", seed=i + 1, r=r, lora_alpha=a) for i, (r, a) in enumerate(ranks_alphas)]
    torch._dynamo.reset()
    model = pk.PeftModel.from_pretrained(_base(), paths[0])
    prepare_model_for_compiled_hotswap(model, target_rank=6)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = _x()
    with torch.no_grad():
        assert_close(compiled(x), _reference_output(paths[0]), FP32_SAME_MATH, "adapter 0 compiled")
        frames = counter.frame_count
        assert frames >= 1
        for path in (paths[1], paths[2], paths[0]):
            hotswap_adapter(compiled, str(path), adapter_name="default", torch_device="cpu")
            assert_close(compiled(x), _reference_output(path), FP32_SAME_MATH, f"swapped to {path.name}")
    assert counter.frame_count == frames, "no recompilation after prepare_model_for_compiled_hotswap"
    with pytest.raises(ValueError, match="before"):
        prepare_model_for_compiled_hotswap(compiled)
    torch._dynamo.reset()


def test_compiled_same_rank_swap_without_prepare(tmp_path):
    from torch._dynamo.testing import CompileCounter

    first = _save_adapter(tmp_path / "a0", seed=1, r=4, lora_alpha=8)
    second = _save_adapter(tmp_path / "a1", seed=2, r=4, lora_alpha=8)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(pk.PeftModel.from_pretrained(_base(), first), backend=counter)
    x = _x()
    with torch.no_grad():
        compiled(x)
        frames = counter.frame_count
        hotswap_adapter(compiled, str(second), adapter_name="default", torch_device="cpu")
        assert_close(compiled(x), _reference_output(second), FP32_SAME_MATH, "swapped compiled")
    assert counter.frame_count == frames
    torch._dynamo.reset()


def test_hotswap_errors(tmp_path):
    first = _save_adapter(tmp_path / "a0", seed=1, r=4, lora_alpha=8)
    other_dropout = _save_adapter(tmp_path / "d", seed=2, r=4, lora_alpha=8, lora_dropout=0.1)
    other_targets = _save_adapter(tmp_path / "t", seed=2, r=4, lora_alpha=8, target_modules=["lin0"])
    model = pk.PeftModel.from_pretrained(_base(), first)
    with pytest.raises(ValueError, match="Configs are incompatible: for lora_dropout, 0.0 != 0.1"):
        hotswap_adapter(model, str(other_dropout), adapter_name="default", torch_device="cpu")
    # Fewer targets: the untargeted modules' adapter weights are zeroed (their update vanishes).
    hotswap_adapter(model, str(other_targets), adapter_name="default", torch_device="cpu")
    assert not model.base_model.model.lin1.lora_B["default"].weight.any()
    with torch.no_grad():
        assert_close(model(_x()), _reference_output(other_targets), FP32_SAME_MATH, "fewer targets")
    narrow = pk.PeftModel.from_pretrained(_base(), other_targets)
    with pytest.raises(RuntimeError, match="unexpected keys found: .*lin1.lora_A.default.weight"):
        hotswap_adapter(narrow, str(first), adapter_name="default", torch_device="cpu")
    model.merge_adapter()
    with pytest.raises(ValueError, match="currently merged"):
        hotswap_adapter(model, str(first), adapter_name="default", torch_device="cpu")
    with pytest.raises(ValueError, match="No adapter layers found"):
        prepare_model_for_compiled_hotswap(_base())
    with pytest.raises(ValueError, match="Incompatible PEFT types"):
        check_hotswap_configs_compatible(pk.LoraConfig(), pk.PromptTuningConfig(task_type="CAUSAL_LM"))
