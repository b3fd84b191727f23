"""Issue #18 item 3: target-module minimisation, tuners_utils' state-dict key helpers, ``BaseTuner.get_model_config``
and ``LoraModel.uses_shared_state``, against real peft 0.21.2."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import peft_kernels as pk
from peft_kernels.tuners import tuners_utils
from peft_kernels.utils.constants import MIN_TARGET_MODULES_FOR_OPTIMIZATION

pytestmark = [pytest.mark.usefixtures("one_thread_quiet"), pytest.mark.oracle]


def _peft_tu():
    pytest.importorskip("peft")
    from peft.tuners import tuners_utils as peft_tu

    return peft_tu


class Stack(nn.Module):
    def __init__(self, layers=12):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(4, 4), "k": nn.Linear(4, 4), "v": nn.Linear(4, 4)}) for _ in range(layers)
        )
        self.head = nn.Linear(4, 2)


def test_find_minimal_target_modules_matches_peft():
    peft_tu = _peft_tu()
    cases = [
        (
            [f"model.decoder.layers.{i}.self_attn.q_proj" for i in range(30)],
            ["model.encoder.layers.0.self_attn.q_proj"],
        ),
        ([f"a.{i}.q" for i in range(25)] + [f"a.{i}.v" for i in range(25)], [f"a.{i}.k" for i in range(25)]),
        (["x.y", "z.y"], ["w.y"]),
    ]
    for targets, others in cases:
        assert tuners_utils._find_minimal_target_modules(targets, others) == peft_tu._find_minimal_target_modules(
            targets, others
        )
    for bad in ("q", [], ["", "q"]):
        with pytest.raises(ValueError):
            tuners_utils._find_minimal_target_modules(bad, [])
    with pytest.raises(ValueError, match="common elements"):
        tuners_utils._find_minimal_target_modules(["a.q"], ["a.q"])
    assert MIN_TARGET_MODULES_FOR_OPTIMIZATION == 20


@pytest.mark.parametrize("layers", [6, 12])  # 18 targets (below the threshold) and 36 (minimised)
def test_injection_minimises_long_target_lists_like_peft(tmp_path, layers):
    peft = pytest.importorskip("peft")
    targets = [f"layers.{i}.{name}" for i in range(layers) for name in ("q", "v")] + [
        f"layers.{i}.k" for i in range(layers // 2)
    ]
    torch.manual_seed(0)
    base = Stack(layers)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=list(targets)))
    ours = pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(target_modules=list(targets)))
    assert ours.peft_config["default"].target_modules == theirs.peft_config["default"].target_modules
    assert sorted(ours.targeted_module_names) == sorted(theirs.targeted_module_names)
    ours.save_pretrained(tmp_path)
    saved = pk.LoraConfig.from_pretrained(tmp_path).target_modules
    assert saved == theirs.peft_config["default"].target_modules
    assert (len(saved) < len(targets)) == (len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION)


def test_state_dict_key_helpers_match_peft():
    peft = pytest.importorskip("peft")
    peft_tu = _peft_tu()
    torch.manual_seed(0)
    config = dict(target_modules=["q", "v"], modules_to_save=["head"])
    theirs = peft.get_peft_model(Stack(2), peft.LoraConfig(**config))
    ours = pk.get_peft_model(Stack(2), pk.LoraConfig(**config))
    theirs.add_adapter("other", peft.LoraConfig(target_modules=["q"]))
    ours.add_adapter("other", pk.LoraConfig(target_modules=["q"]))
    for adapter in (None, "default", "other"):
        expected = peft_tu._get_tuner_state_dict_key_prefixes(theirs, adapter)
        assert tuners_utils._get_tuner_state_dict_key_prefixes(ours, adapter) == expected, adapter
        sd = ours.state_dict()
        filtered = tuners_utils._filter_state_dict_by_key_prefixes(sd, expected)
        assert set(filtered) == set(peft_tu._filter_state_dict_by_key_prefixes(theirs.state_dict(), expected))
    for key in ("m.lora_A.default.weight", "m.lora_embedding_A.default", "default.lora_A.default.weight", "w"):
        assert tuners_utils._remove_adapter_name_from_state_dict_key(
            key, "default"
        ) == peft_tu._remove_adapter_name_from_state_dict_key(key, "default")
    assert tuners_utils._is_key_under_prefixes("a.b.c", {"a.b"}) and not tuners_utils._is_key_under_prefixes(
        "a.bc", {"a.b"}
    )


def test_get_model_config_and_uses_shared_state_match_peft():
    peft = pytest.importorskip("peft")
    from transformers import GPT2Config

    @dataclasses.dataclass
    class DataConfig:
        model_type: str = "toy"
        hidden: int = 4

    plain = nn.Linear(2, 2)
    with_dc = nn.Linear(2, 2)
    with_dc.config = DataConfig()
    with_hf = nn.Linear(2, 2)
    with_hf.config = GPT2Config(n_layer=1)
    for model in (plain, with_dc, with_hf):
        assert pk.LoraModel.get_model_config(model) == peft.LoraModel.get_model_config(model)
    assert pk.LoraModel.uses_shared_state is peft.LoraModel.uses_shared_state is False
