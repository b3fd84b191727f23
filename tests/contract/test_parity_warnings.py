"""Issue #18 item 6: warnings PEFT 0.21.2 emits, emitted by peft_kernels with the same category and text."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peft_kernels as pk

pytestmark = [pytest.mark.usefixtures("one_thread_quiet"), pytest.mark.oracle]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize(
    "patterns",
    [dict(rank_pattern={"nope": 2}), dict(alpha_pattern={"0": 3, "typo": 5}), dict(rank_pattern={"0": 2})],
)
def test_unmatched_rank_and_alpha_pattern_keys_warn_like_peft(patterns):
    peft = pytest.importorskip("peft")
    found = []
    for lib in (peft, pk):
        config = lib.LoraConfig(target_modules=["0"], **patterns)
        caught = _caught(lambda lib=lib, config=config: lib.get_peft_model(_mlp(), config))
        found.append([c for c in caught if "did not match any targeted module" in c[1]])
    assert found[1] == found[0]
    assert bool(found[1]) == any(k in ("nope", "typo") for p in patterns.values() for k in p)
    if found[1]:
        assert found[1][0][0] is RuntimeWarning


def _save_and_edit(lib, tmp_path, edit):
    """An adapter saved by ``lib`` whose safetensors file ``edit`` changed (a key added or removed)."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / lib.__name__
    lib.get_peft_model(_mlp(), lib.LoraConfig(target_modules=["0"])).save_pretrained(path)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)
    return path


def _extra_key(tensors):
    tensors["base_model.model.9.lora_A.weight"] = torch.zeros(2, 2)


def _drop_key(tensors):
    tensors.pop("base_model.model.0.lora_A.weight")


SCENARIOS = {
    # a layer without a bias given lora_bias=True: a PeftWarning (merging it is refused later)
    "lora_bias_on_unbiased_layer": lambda lib, tmp: lib.get_peft_model(
        nn.Sequential(nn.Linear(4, 4, bias=False)), lib.LoraConfig(target_modules=["0"], lora_bias=True)
    ),
    # a module both targeted and in modules_to_save: PEFT neither warns nor fails
    "target_also_in_modules_to_save": lambda lib, tmp: lib.get_peft_model(
        _mlp(), lib.LoraConfig(target_modules=["0", "2"], modules_to_save=["2"])
    )(torch.ones(1, 4)),
    # checkpoint keys the model does not know: no warning from from_pretrained nor load_adapter
    "unknown_checkpoint_keys": lambda lib, tmp: lib.PeftModel.from_pretrained(
        _mlp(), _save_and_edit(lib, tmp, _extra_key)
    ).load_adapter(tmp / lib.__name__, "other"),
    # a checkpoint lacking an adapter tensor: "Found missing adapter keys ..."
    "missing_checkpoint_keys": lambda lib, tmp: lib.PeftModel.from_pretrained(
        _mlp(), _save_and_edit(lib, tmp, _drop_key)
    ),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_warnings_match_peft(scenario, tmp_path):
    peft = pytest.importorskip("peft")
    found = [_caught(lambda lib=lib: SCENARIOS[scenario](lib, tmp_path)) for lib in (peft, pk)]
    expected = {
        "lora_bias_on_unbiased_layer": 1,
        "target_also_in_modules_to_save": 0,
        "unknown_checkpoint_keys": 0,
        "missing_checkpoint_keys": 1,
    }[scenario]
    assert len(found[0]) == expected, f"peft 0.21.2 itself changed: {found[0]}"
    assert [(c.__name__, m) for c, m in found[1]] == [(c.__name__, m) for c, m in found[0]]


def test_merging_into_int8_warns_about_rounding_like_peft():
    peft = pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    found = []
    for lib in (peft, pk):
        torch.manual_seed(0)
        net = nn.Sequential(bnb.nn.Linear8bitLt(8, 8, bias=True, has_fp16_weights=False))
        net[0].load_state_dict(nn.Linear(8, 8).state_dict())
        net = net.to("cpu")  # quantizes: bnb turns Int8Params into int8 + scales on the move to a device
        net.is_loaded_in_8bit = True  # what transformers sets; PEFT picks its bnb LoRA layer only then
        model = lib.get_peft_model(net, lib.LoraConfig(target_modules=["0"]))
        found.append(_caught(model.merge_and_unload))
    rounding = [(c.__name__, m) for c, m in found[0] if "rounding errors" in m]
    assert len(rounding) == 1
    assert [(c.__name__, m) for c, m in found[1] if "rounding errors" in m] == rounding
