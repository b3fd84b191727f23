"""LoRA on every model family of the foundation issue: train, merge, disable, save/load; and against PEFT.

Rows follow PEFT's ``test_custom_models`` style: one family per row, tiny random models from configs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings

import pytest
import torch
from _models import EXPLICIT_TARGETS, FAMILIES, MODULES_TO_SAVE, logits_of, make_inputs, make_model
from _tolerances import EXACT, FP32_SAME_MATH, MERGE, assert_close
from safetensors.torch import load_file

import peft_kernels as pk
from peft_kernels.layers import BaseTunerLayer


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def lora_kwargs(family: str, **extra) -> dict:
    kwargs = dict(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=EXPLICIT_TARGETS.get(family),
        modules_to_save=MODULES_TO_SAVE.get(family),
    )
    _, task = make_model(family)
    kwargs["task_type"] = task
    kwargs.update(extra)
    return kwargs


def loss_of(output) -> torch.Tensor:
    return logits_of(output).float().pow(2).mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_train_merge_disable_save(family, tmp_path):
    base, _ = make_model(family)
    inputs = make_inputs(family)
    with torch.no_grad():
        base_logits = logits_of(base(**inputs)).clone()
    model = pk.get_peft_model(base, pk.LoraConfig(**lora_kwargs(family)))
    assert any(isinstance(m, BaseTunerLayer) for m in model.modules())

    # Forward + backward: gradients exactly on adapter (and modules_to_save) parameters.
    model.train()
    loss_of(model(**inputs)).backward()
    for name, param in model.named_parameters():
        trainable = "lora_" in name or "modules_to_save" in name
        assert param.requires_grad == trainable, name
        assert (param.grad is not None) == trainable, name
    model.eval()
    with torch.no_grad():
        adapted = logits_of(model(**inputs)).clone()
    assert not torch.allclose(adapted, base_logits), "init_lora_weights=False must change the output"

    # disable_adapter() computes the base model exactly; leaving it restores the adapter.
    with torch.no_grad(), model.disable_adapter():
        disabled = logits_of(model(**inputs))
    if not MODULES_TO_SAVE.get(family):
        assert_close(disabled, base_logits, EXACT, "disable_adapter")
    with torch.no_grad():
        assert_close(logits_of(model(**inputs)), adapted, EXACT, "after disable_adapter")

    # merge -> unmerge keeps the output.
    with torch.no_grad():
        model.merge_adapter()
        merged = logits_of(model(**inputs))
        model.unmerge_adapter()
        unmerged = logits_of(model(**inputs))
    assert_close(merged, adapted, MERGE, "merged")
    assert_close(unmerged, adapted, MERGE, "unmerged")

    # save -> load into a fresh base gives identical logits.
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    fresh, _ = make_model(family)
    loaded = pk.PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert_close(logits_of(loaded(**inputs)), adapted, EXACT, "reloaded")


# ------------------------------------------------------------------------------------------- PEFT oracle
def _peft():
    return pytest.importorskip("peft")


def _trainable_text(model) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        model.print_trainable_parameters()
    return buffer.getvalue()


def _json_without_version(path) -> dict:
    with open(os.path.join(path, "adapter_config.json")) as f:
        data = json.load(f)
    data.pop("peft_version")
    return data


@pytest.mark.oracle
@pytest.mark.parametrize("family", FAMILIES)
def test_same_as_peft(family, tmp_path):
    peft = _peft()
    inputs = make_inputs(family)
    ours_base, _ = make_model(family)
    theirs_base, _ = make_model(family)
    ours = pk.get_peft_model(ours_base, pk.LoraConfig(**lora_kwargs(family, lora_dropout=0.0)))
    theirs = peft.get_peft_model(theirs_base, peft.LoraConfig(**lora_kwargs(family, lora_dropout=0.0)))

    # Same module tree, same model-side keys; then the same weights.
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert _trainable_text(ours) == _trainable_text(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()

    # Same outputs and adapter gradients (fp32). Eval mode: base-model dropout would draw different masks.
    ours.eval(), theirs.eval()
    out_ours, out_theirs = ours(**inputs), theirs(**inputs)
    assert_close(logits_of(out_ours), logits_of(out_theirs), FP32_SAME_MATH, "logits vs peft")
    loss_of(out_ours).backward()
    loss_of(out_theirs).backward()
    grads_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    grads_ours = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert set(grads_ours) == set(grads_theirs)
    for name, grad in grads_ours.items():
        assert_close(grad, grads_theirs[name], FP32_SAME_MATH, f"grad {name}")

    # Checkpoints: same files, keys, tensors and JSON (modulo peft_version); each loads in the other.
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    ours.save_pretrained(ours_dir)
    theirs.save_pretrained(theirs_dir)
    sd_ours = load_file(ours_dir / "adapter_model.safetensors")
    sd_theirs = load_file(theirs_dir / "adapter_model.safetensors")
    assert set(sd_ours) == set(sd_theirs)
    for key in sd_ours:
        assert torch.equal(sd_ours[key], sd_theirs[key]), key
    assert _json_without_version(ours_dir) == _json_without_version(theirs_dir)

    with torch.no_grad():
        expected = logits_of(theirs(**inputs))
        peft_loads_ours = peft.PeftModel.from_pretrained(make_model(family)[0], ours_dir)
        assert_close(logits_of(peft_loads_ours(**inputs)), expected, FP32_SAME_MATH, "peft loads ours")
        ours_loads_peft = pk.PeftModel.from_pretrained(make_model(family)[0], theirs_dir)
        assert_close(logits_of(ours_loads_peft(**inputs)), expected, FP32_SAME_MATH, "ours loads peft")
