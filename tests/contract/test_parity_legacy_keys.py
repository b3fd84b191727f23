"""Issue #18 item 3: a LoRA checkpoint saved with a model's pre-transformers-5 module names loads onto the renamed
model, as in PEFT 0.21.2: through transformers' registered renamings (``exaone`` renamed ``transformer.h.N.attn.
attention`` to ``model.layers.N.self_attn``, ``mlp.c_proj`` to ``mlp.down_proj``), and through a model class's own
``_checkpoint_conversion_mapping`` regexes in ``from_pretrained``."""

from __future__ import annotations

import pytest
import torch
from _tolerances import FP32_SAME_MATH, assert_close
from torch import nn

import peft_kernels as pk

pytestmark = [pytest.mark.usefixtures("one_thread_quiet"), pytest.mark.oracle]

TARGETS = ["q_proj", "o_proj", "down_proj"]
# new name -> the name the same module had before transformers 5 (transformers' exaone renamings, inverted)
OLD_NAMES = [
    ("model.layers.", "transformer.h."),
    ("self_attn.o_proj", "attn.attention.out_proj"),
    ("self_attn.", "attn.attention."),
    ("mlp.down_proj", "mlp.c_proj"),
]


def _exaone():
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        "exaone", hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, vocab_size=50, head_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _old_names(state_dict):
    renamed = {}
    for key, value in state_dict.items():
        for new, old in OLD_NAMES:
            key = key.replace(new, old)
        renamed[key] = value
    return renamed


def _trained_legacy_checkpoint(peft):
    model = peft.get_peft_model(_exaone(), peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False))
    state = peft.get_peft_model_state_dict(model)
    legacy = _old_names(state)
    assert not set(legacy) & set(state), "the checkpoint must really use the old names"
    return state, legacy


def test_set_peft_model_state_dict_renames_legacy_lora_keys_like_peft():
    peft = pytest.importorskip("peft")
    state, legacy = _trained_legacy_checkpoint(peft)
    ids = torch.tensor([[3, 4, 5, 6]])
    results = []
    for lib in (peft, pk):
        model = lib.get_peft_model(_exaone(), lib.LoraConfig(target_modules=TARGETS))
        load = lib.set_peft_model_state_dict(model, legacy)
        lora_missing = sorted(k for k in load.missing_keys if "lora_" in k)
        loaded = lib.get_peft_model_state_dict(model)
        with torch.no_grad():
            results.append((lora_missing, list(load.unexpected_keys), loaded, model(input_ids=ids).logits))
    (peft_missing, peft_unexpected, peft_sd, peft_out), (missing, unexpected, ours_sd, out) = results
    assert missing == peft_missing == []
    assert unexpected == peft_unexpected == []
    assert sorted(ours_sd) == sorted(peft_sd) == sorted(state)
    for key in state:
        assert torch.equal(ours_sd[key], state[key]), key
    assert_close(out, peft_out, FP32_SAME_MATH)


def test_checkpoint_in_current_names_is_left_alone():
    peft = pytest.importorskip("peft")
    state, _ = _trained_legacy_checkpoint(peft)
    model = pk.get_peft_model(_exaone(), pk.LoraConfig(target_modules=TARGETS))
    load = pk.set_peft_model_state_dict(model, state)
    assert load.unexpected_keys == [] and not [k for k in load.missing_keys if "lora_" in k]
    loaded = pk.get_peft_model_state_dict(model)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


class _RenamedMLP(nn.Module):
    """A model whose ``proj`` was called ``old_proj`` in checkpoints it still accepts (a class-level key map)."""

    _checkpoint_conversion_mapping = {"^old_proj": "proj"}

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.proj(x))


def test_from_pretrained_applies_the_model_class_key_mapping(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    trained = peft.get_peft_model(_RenamedMLP(), peft.LoraConfig(target_modules=["proj"], init_lora_weights=False))
    torch.manual_seed(1)  # weights a fresh load (same seed, same config) would not reproduce
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.normal_()
    trained.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    saved = load_file(weights)
    save_file({k.replace(".proj.", ".old_proj."): v for k, v in saved.items()}, weights)
    x = torch.randn(3, 4)
    outputs = []
    for lib in (peft, pk):
        model = lib.PeftModel.from_pretrained(_RenamedMLP(), tmp_path)
        sd = lib.get_peft_model_state_dict(model)
        assert sorted(sd) == sorted(saved) and all(torch.equal(sd[k], saved[k]) for k in saved), lib.__name__
        with torch.no_grad():
            outputs.append(model(x))
    assert_close(outputs[1], outputs[0], FP32_SAME_MATH)
