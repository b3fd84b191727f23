"""Mixed-adapter batches (``adapter_names=``) on forward and generate, against PEFT 0.21.2 and a per-sample loop.

Each model carries 3 adapters of ranks 4, 8 and 16 (different weights) and the batch mixes them with
``"__base__"``. Checked: forward of every task family (GPT-2 Conv1D, Llama with an Embedding LoRA, T5 seq2seq,
BERT sequence classification with a per-adapter head) equals PEFT's mixed forward and the rows of set_adapter /
disable_adapter runs; generate (greedy and beam search, decoder-only and seq2seq) gives the tokens of per-adapter
generation and of PEFT; the errors are PEFT's (type and message); int8 bases run the grouped path.
"""

from __future__ import annotations

import pytest
import torch
from _models import logits_of, make_inputs, make_model
from _tolerances import FP32_SAME_MATH, assert_close

import peft_kernels as pk

RANKS = {"a": 4, "b": 8, "c": 16}
NAMES = ["a", "__base__", "c", "b", "a"]
# Families of the issue, with the layer types they exercise: GPT-2 Conv1D; Llama Linear + Embedding;
# T5 encoder-decoder Linear; BERT Linear + a modules_to_save classification head per adapter.
TARGETS = {"gpt2": None, "llama": ["q_proj", "v_proj", "embed_tokens"], "t5": None, "bert": None}


pytestmark = pytest.mark.usefixtures("one_thread_quiet")


def build(lib, family: str):
    """``lib``'s PEFT model on the tiny ``family`` model with adapters a, b, c (seeded, so ours == PEFT's)."""
    base, task = make_model(family)
    model = None
    for i, (name, r) in enumerate(RANKS.items()):
        config = lib.LoraConfig(
            task_type=task, r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules=TARGETS[family]
        )
        torch.manual_seed(100 + i)
        if model is None:
            model = lib.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.eval()


def per_sample_reference(model, names, run):
    """Row i of ``run()`` under set_adapter(names[i]) (disable_adapter for "__base__"), stacked."""
    outputs = {}
    for name in dict.fromkeys(names):
        if name == "__base__":
            with model.disable_adapter():
                outputs[name] = run()
        else:
            model.set_adapter(name)
            outputs[name] = run()
    model.set_adapter("a")
    return torch.stack([outputs[name][i] for i, name in enumerate(names)])


@pytest.mark.oracle
@pytest.mark.parametrize("family", list(TARGETS))
def test_forward_equals_peft_and_per_sample_loop(family):
    peft = pytest.importorskip("peft")
    ours, theirs = build(pk, family), build(peft, family)
    theirs.load_state_dict(ours.state_dict())
    inputs = make_inputs(family, batch=len(NAMES))
    with torch.no_grad():
        mixed = logits_of(ours(**inputs, adapter_names=NAMES))
        peft_mixed = logits_of(theirs(**inputs, adapter_names=NAMES))
        loop = per_sample_reference(ours, NAMES, lambda: logits_of(ours(**inputs)))
    assert_close(mixed, peft_mixed, FP32_SAME_MATH, f"{family}: vs peft")
    assert_close(mixed, loop, FP32_SAME_MATH, f"{family}: vs set_adapter loop")
    # The adapters differ from each other and from the base: a row routed to the wrong adapter would show.
    rows = {name: loop[i] for i, name in enumerate(NAMES)}
    assert len({tuple(v.flatten()[:8].tolist()) for v in rows.values()}) == len(rows)


def _generate_kwargs(family, beams):
    inputs = make_inputs(family, batch=len(NAMES))
    inputs.pop("decoder_input_ids", None)
    return dict(**inputs, max_new_tokens=5, do_sample=False, num_beams=beams, pad_token_id=0)


@pytest.mark.oracle
@pytest.mark.parametrize("beams", [1, 2])
@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_generate_equals_per_adapter_generation_and_peft(family, beams):
    peft = pytest.importorskip("peft")
    ours, theirs = build(pk, family), build(peft, family)
    theirs.load_state_dict(ours.state_dict())
    kwargs = _generate_kwargs(family, beams)
    with torch.no_grad():
        mixed = ours.generate(**kwargs, adapter_names=NAMES)
        peft_mixed = theirs.generate(**kwargs, adapter_names=NAMES)
        loop = per_sample_reference(ours, NAMES, lambda: ours.generate(**kwargs))
    assert torch.equal(mixed, loop), f"mixed:\n{mixed}\nper adapter:\n{loop}"
    assert torch.equal(mixed, peft_mixed), f"ours:\n{mixed}\npeft:\n{peft_mixed}"


def _error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.oracle
def test_errors_are_peft_errors():
    peft = pytest.importorskip("peft")
    ours, theirs = build(pk, "gpt2"), build(peft, "gpt2")
    inputs = make_inputs("gpt2", batch=len(NAMES))
    cases = {
        "unknown name": dict(adapter_names=["a", "nope", "zzz", "b", "a"]),
        "length mismatch": dict(adapter_names=NAMES[:-1]),
    }
    for label, extra in cases.items():
        ours_error = _error(lambda extra=extra: ours(**inputs, **extra))
        assert ours_error == _error(lambda extra=extra: theirs(**inputs, **extra)), label
        assert ours_error[0] is ValueError, label
    # Training mode.
    ours.train(), theirs.train()
    ours_error = _error(lambda: ours(**inputs, adapter_names=NAMES))
    assert ours_error == _error(lambda: theirs(**inputs, adapter_names=NAMES)) and "training mode" in ours_error[1]
    ours.eval(), theirs.eval()
    # Merged adapters.
    ours.merge_adapter(["a"]), theirs.merge_adapter(["a"])
    ours_error = _error(lambda: ours(**inputs, adapter_names=NAMES))
    assert ours_error == _error(lambda: theirs(**inputs, adapter_names=NAMES)) and "merged" in ours_error[1]
    # Beam search with a non-list adapter_names.
    ours.unmerge_adapter(), theirs.unmerge_adapter()
    kwargs = _generate_kwargs("gpt2", 2)
    ours_error = _error(lambda: ours.generate(**kwargs, adapter_names="a"))
    assert ours_error == _error(lambda: theirs.generate(**kwargs, adapter_names="a"))
    assert ours_error[0] is TypeError


def test_nothing_changes_after_an_error():
    model = build(pk, "gpt2")
    inputs = make_inputs("gpt2", batch=len(NAMES))
    with torch.no_grad():
        before = logits_of(model(**inputs))
        with pytest.raises(ValueError, match="non-existing adapter"):
            model(**inputs, adapter_names=["nope"] * len(NAMES))
        with pytest.raises(ValueError, match="Length of `adapter_names`"):
            model(**inputs, adapter_names=NAMES[:2])
        assert_close(logits_of(model(**inputs)), before, (0.0, 0.0), "no hook left behind")
    assert model.active_adapter == "a"
    assert all(not m._forward_pre_hooks for m in model.modules())


def _int8_lora(lib, path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    model = None
    for name, r in RANKS.items():
        config = lib.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, init_lora_weights=False)
        if model is None:
            model = lib.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.eval()


@pytest.mark.oracle
def test_int8_base_equals_peft(tmp_path):
    """bitsandbytes' CPU int8 matmul picks outlier columns over the whole batch, so a mixed batch is not
    row-for-row a per-adapter batch (the base output changes with the batch); PEFT runs the same base on the
    same batch, so ours and PEFT's must agree to fp32 same-math tolerance."""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    make_model("opt")[0].save_pretrained(tmp_path)
    ours, theirs = _int8_lora(pk, tmp_path), _int8_lora(peft, tmp_path)
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_" in name:
                theirs_params[name].copy_(param)
    inputs = make_inputs("opt", batch=len(NAMES))
    with torch.no_grad():
        mixed = logits_of(ours(**inputs, adapter_names=NAMES))
        peft_mixed = logits_of(theirs(**inputs, adapter_names=NAMES))
        base = logits_of(ours(**inputs, adapter_names=["__base__"] * len(NAMES)))
    assert_close(mixed, peft_mixed, FP32_SAME_MATH, "int8 mixed vs peft")
    assert not torch.allclose(mixed, base), "the adapters must change the output"
