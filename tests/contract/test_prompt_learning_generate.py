"""docs/PEFT_CONTRACT.md §8.5: prompt-learning ``generate`` equals the base model fed the virtual tokens by hand
(PEFT's own generation mechanics are wrong on recent transformers, so PEFT is not the oracle here). The model
builders and the module's one-thread / quiet fixtures are test_prompt_learning.py's."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import make_model
from _tolerances import FP32_SAME_MATH, assert_close
from test_prompt_learning import (  # noqa: F401 - the autouse fixtures apply here too
    BASIC_METHODS,
    NVT,
    _one_thread,
    _quiet,
    make_config,
    perturb_trainable,
)

import peft_kernels as pk

# ---------------------------------------------------------------------------- generation
GENERATE_FAMILIES = ["gpt2", "llama", "opt", "bloom", "t5", "bart"]


def _greedy(model, **kwargs):
    return model.generate(
        max_new_tokens=4,
        min_new_tokens=4,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )


@pytest.mark.parametrize("method", BASIC_METHODS)
@pytest.mark.parametrize("family", GENERATE_FAMILIES)
def test_generate_equals_base_fed_by_hand(family, method):
    base, task = make_model(family)
    reference = copy.deepcopy(base)
    model = pk.get_peft_model(base, make_config(pk, method, task))
    perturb_trainable(model, scale=1.0)
    input_ids = torch.tensor([[5, 6, 7], [8, 9, 7]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    pad = {"pad_token_id": reference.config.pad_token_id}
    prefixed_mask = torch.cat((torch.ones(2, NVT, dtype=torch.long), mask), dim=1)
    out = _greedy(model, input_ids=input_ids, attention_mask=mask, **pad)

    with torch.no_grad():
        if method == "prefix":
            # The prefix as the initial cache; transformers derives positions P.. from the prefixed mask.
            # (Encoder-decoder: the prefix is decoder-side only, the encoder mask stays as given.)
            ref_mask = prefixed_mask if task == "CAUSAL_LM" else mask
            ref = _greedy(
                reference, input_ids=input_ids, attention_mask=ref_mask, past_key_values=model.get_prompt(2), **pad
            )
        else:
            rows = model.get_prompt(2)[:, :NVT]
            embeds = torch.cat((rows, reference.get_input_embeddings()(input_ids)), dim=1)
            ref = _greedy(reference, inputs_embeds=embeds, attention_mask=prefixed_mask, **pad)
        plain = _greedy(reference, input_ids=input_ids, attention_mask=mask, **pad)
    ref_sequences = ref.sequences
    if task == "CAUSAL_LM" and method != "prefix":
        ref_sequences = torch.cat((input_ids, ref_sequences), dim=1)  # embeddings input: only new tokens come back
    assert torch.equal(out.sequences, ref_sequences)
    assert len(out.scores) == len(ref.scores) == 4
    for step, (got, expected) in enumerate(zip(out.scores, ref.scores)):
        assert_close(got, expected, FP32_SAME_MATH, f"scores[{step}]")
    assert not torch.allclose(out.scores[0], plain.scores[0]), "the prompt had no effect"


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generate_equals_manual_greedy_loop(method):
    """Llama (RoPE, GQA), no padding: an explicit decode loop with the cache, independent of generate()."""
    base, task = make_model("llama")
    reference = copy.deepcopy(base)
    model = pk.get_peft_model(base, make_config(pk, method, task))
    perturb_trainable(model, scale=1.0)
    input_ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = model.generate(input_ids=input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        if method == "prefix":
            cache = model.get_prompt(2)
            step = reference(input_ids=input_ids, past_key_values=cache, attention_mask=torch.ones(2, NVT + 4))
        else:
            embeds = torch.cat((model.get_prompt(2), reference.get_input_embeddings()(input_ids)), dim=1)
            step = reference(inputs_embeds=embeds, use_cache=True)
        tokens = [step.logits[:, -1].argmax(-1)]
        cache = step.past_key_values
        for _ in range(3):
            length = cache.get_seq_length() + 1
            step = reference(
                input_ids=tokens[-1][:, None], past_key_values=cache, attention_mask=torch.ones(2, length)
            )
            tokens.append(step.logits[:, -1].argmax(-1))
            cache = step.past_key_values
    assert torch.equal(out, torch.cat((input_ids, torch.stack(tokens, dim=1)), dim=1))


def test_generate_beam_search_and_prefix_shapes():
    base, task = make_model("gpt2")
    reference = copy.deepcopy(base)
    model = pk.get_peft_model(base, make_config(pk, "prompt", task))
    perturb_trainable(model, scale=1.0)
    input_ids = torch.tensor([[5, 6, 7], [8, 9, 7]])
    kwargs = dict(max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=input_ids, **kwargs)
    with torch.no_grad():
        embeds = torch.cat((model.get_prompt(2), reference.get_input_embeddings()(input_ids)), dim=1)
        ref = reference.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(2, NVT + 3, dtype=torch.long), **kwargs
        )
    assert torch.equal(out, torch.cat((input_ids, ref), dim=1))

    prefix_model = pk.get_peft_model(make_model("gpt2")[0], make_config(pk, "prefix", "CAUSAL_LM"))
    beams = prefix_model.generate(input_ids, **kwargs)  # positional input_ids work for decoders
    assert beams.shape == (2, 6)


def test_seq2seq_generate_arguments():
    model = pk.get_peft_model(make_model("t5")[0], make_config(pk, "prefix", "SEQ_2_SEQ_LM"))
    with pytest.raises(TypeError):
        model.generate(torch.tensor([[5, 6]]))
    with pytest.raises(ValueError, match="input_ids must be provided for Peft model generation"):
        model.generate(inputs_embeds=torch.zeros(1, 2, 32))


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generate_from_inputs_embeds(method):
    model = pk.get_peft_model(make_model("gpt2")[0], make_config(pk, method, "CAUSAL_LM"))
    perturb_trainable(model, scale=1.0)
    input_ids = torch.tensor([[5, 6, 7], [8, 9, 7]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    by_ids = model.generate(input_ids=input_ids, **kwargs)
    by_embeds = model.generate(inputs_embeds=model.word_embeddings(input_ids), **kwargs)
    assert torch.equal(by_embeds, by_ids[:, 3:])  # transformers returns only new tokens for an embeddings input
