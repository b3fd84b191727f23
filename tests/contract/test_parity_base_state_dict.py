"""Issue #18 item 3: ``get_base_model_state_dict`` / ``set_base_model_state_dict`` against real peft 0.21.2."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peft_kernels as pk

pytestmark = pytest.mark.usefixtures("one_thread_quiet")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)


def _configs(lib):
    return [
        lib.LoraConfig(target_modules=["lin", "emb"], modules_to_save=["head"], bias="lora_only"),
        lib.LoraConfig(target_modules=["mha", "lin"], r=2),
    ]


@pytest.mark.oracle
@pytest.mark.parametrize("index", [0, 1])
def test_get_and_set_match_peft(index):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Net()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    theirs = peft.get_peft_model(copy.deepcopy(base), _configs(peft)[index])
    ours = pk.get_peft_model(copy.deepcopy(base), _configs(pk)[index])
    got_t = peft.get_base_model_state_dict(theirs)
    got_o = pk.get_base_model_state_dict(ours)
    assert set(got_o) == set(got_t) == set(original)
    assert all(torch.equal(got_o[k], original[k]) for k in original)

    new = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in original.items()}
    result_t = peft.set_base_model_state_dict(theirs, new)
    result_o = pk.set_base_model_state_dict(ours, new)
    assert (result_o.missing_keys, result_o.unexpected_keys) == (result_t.missing_keys, result_t.unexpected_keys)
    assert all(torch.equal(pk.get_base_model_state_dict(ours)[k], new[k]) for k in new)

    partial = dict(list(new.items())[1:]) | {"nope.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*Unexpected key.*nope.weight"):
        pk.set_base_model_state_dict(ours, partial)
    result_o = pk.set_base_model_state_dict(ours, partial, strict=False)
    result_t = peft.set_base_model_state_dict(theirs, partial, strict=False)
    assert (result_o.missing_keys, result_o.unexpected_keys) == (result_t.missing_keys, result_t.unexpected_keys)


def test_module_named_base_layer_keeps_its_name():
    net = nn.Sequential()
    net.add_module("base_layer", nn.Linear(4, 4))
    model = pk.get_peft_model(net, pk.LoraConfig(target_modules=["base_layer"]))
    assert set(pk.get_base_model_state_dict(model)) == {"base_layer.weight", "base_layer.bias"}
