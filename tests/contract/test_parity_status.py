"""Issue #18 item 5: ``get_layer_status`` / ``get_model_status`` fields and values equal peft 0.21.2's
(layer names, modules_to_save wrappers, "irregular", quantization_backend, devices)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import peft_kernels as pk

pytestmark = [pytest.mark.usefixtures("one_thread_quiet"), pytest.mark.oracle]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(4, 4)
        self.emb = nn.Embedding(5, 4)
        self.lin1 = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


def _both(build):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Net()
    return build(peft, copy.deepcopy(base)), build(pk, copy.deepcopy(base))


def _assert_same_status(theirs, ours, lib_theirs):
    layers_t = [dataclasses.asdict(s) for s in lib_theirs.get_layer_status(theirs)]
    layers_o = [dataclasses.asdict(s) for s in pk.get_layer_status(ours)]
    assert layers_o == layers_t
    assert dataclasses.asdict(pk.get_model_status(ours)) == dataclasses.asdict(lib_theirs.get_model_status(theirs))


def _two_adapters(lib, base):
    model = lib.get_peft_model(base, lib.LoraConfig(target_modules=["lin0", "emb"], modules_to_save=["head"]))
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin0", "lin1"]))
    return model


def test_peft_model_status_matches():
    peft = pytest.importorskip("peft")
    theirs, ours = _both(_two_adapters)
    _assert_same_status(theirs, ours, peft)
    assert pk.get_layer_status(ours)[0].name == "model.lin0"
    assert pk.get_model_status(ours).quantization_backend is None


@pytest.mark.parametrize("change", ["merge_one", "disable_one_layer", "mixed_requires_grad", "set_other"])
def test_irregular_states_match(change):
    peft = pytest.importorskip("peft")
    theirs, ours = _both(_two_adapters)
    for model in (theirs, ours):
        inner = model.base_model.model
        if change == "merge_one":
            inner.lin0.merge(adapter_names=["default"])
        elif change == "disable_one_layer":
            inner.lin1.enable_adapters(False)
        elif change == "mixed_requires_grad":
            inner.lin0.lora_A["default"].weight.requires_grad_(False)
        else:
            model.set_adapter("other")
    _assert_same_status(theirs, ours, peft)
    if change == "set_other":  # "other" has no copy of head: the original head runs again, as in PEFT
        x = torch.randn(3, 4)
        head_t, head_o = theirs.base_model.model.head, ours.base_model.model.head
        assert torch.equal(head_o(x), head_t(x)) and torch.equal(head_o(x), head_o.original_module(x))
    status = pk.get_model_status(ours)
    assert "irregular" in (
        status.merged_adapters,
        status.enabled,
        status.requires_grad.get("default"),
        status.active_adapters,
    )


def test_bare_injected_model_status_matches():
    peft = pytest.importorskip("peft")

    def inject(lib, base):
        return lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0", "lin1"]), base)

    theirs, ours = _both(inject)
    _assert_same_status(theirs, ours, peft)
    assert pk.get_model_status(ours).base_model_type == "other"
    with pytest.raises(ValueError, match="No adapter layers found in the model"):
        pk.get_layer_status(Net())
