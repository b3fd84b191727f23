"""The fused prefix K/V cache (``PrefixKVCache``) against transformers' ``DynamicCache`` path (docs/KERNELS.md §7).

Every check runs the same model twice, ``PEFT_KERNELS_PREFIX_CACHE=dynamic`` (the reference path: the broadcast prefix
in a ``DynamicCache`` that ``torch.cat``s each update, itself checked against peft 0.21.2 and the hand-fed base model
in test_prompt_learning.py) and ``fused`` (the default), and asks for the same outputs, gradients, generated ids and
scores. Also: without autograd (``generate``) the prefix is written by ONE ``ops.prefix_kv_fill`` call per forward,
each layer's update is one ``ops.kv_append`` and nothing is reallocated when the planned length holds; a forward
that records autograd concatenates each layer once (no fill, no append op); and the cache protocol (crop, beam reorder, batch select/repeat, reset, growth past the plan, a second forward with
gradients on the same cache, dtype promotion) matches ``DynamicCache``. Runs on transformers 5.17, 5.23 and 5.24.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import transformers as tf
from _models import make_inputs, make_model
from _tolerances import EXACT, FP32_SAME_MATH, assert_close

import peft_kernels as pk
from peft_kernels.layers import prefix as layers_prefix
from peft_kernels.tuners import prefix_cache_builder
from peft_kernels.tuners.prefix_kv_cache import PrefixKVCache, PrefixKVLayer

NVT = 3
HEADS = {
    ("bert", "SEQ_CLS"): tf.BertForSequenceClassification,
    ("roberta", "TOKEN_CLS"): tf.RobertaForTokenClassification,
    ("gpt2", "QUESTION_ANS"): tf.GPT2ForQuestionAnswering,
    ("llama", "SEQ_CLS"): tf.LlamaForSequenceClassification,
}


# One torch thread and no warnings for every test of this file (the fixture lives in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread_quiet")


@contextlib.contextmanager
def cache_mode(mode: str):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(prefix_cache_builder.PREFIX_CACHE_ENV, mode)
        yield


@pytest.fixture
def calls(monkeypatch):
    """Counts prefix_kv_fill calls (and layers filled), kv_append calls, KVBuffer reallocations and
    concatenations (with the rows each wrote)."""
    counts = {"write": 0, "layers": 0, "append": 0, "realloc": 0, "rows": [], "concat": 0, "concat_rows": []}
    real_write, real_append, real_append_checked, real_realloc, real_concat = (
        layers_prefix.fill_checked,
        layers_prefix.kv_append,
        layers_prefix.append_checked,
        layers_prefix.KVBuffer._replace,
        layers_prefix.KVBuffer._concatenate,
    )

    def write(prefix, k_bufs, v_bufs, backend):  # prefix_kv_buffers' route (its checks already made)
        counts["write"] += 1
        counts["layers"] += len(k_bufs)
        counts["rows"].append(k_bufs[0].shape[2])
        return real_write(prefix, k_bufs, v_bufs, backend)

    def append(*args, **kwargs):
        counts["append"] += 1
        return real_append(*args, **kwargs)

    def append_checked(*args, **kwargs):  # KVBuffer.append's route (its checks already made)
        counts["append"] += 1
        return real_append_checked(*args, **kwargs)

    def realloc(self, *args):
        counts["realloc"] += 1
        return real_realloc(self, *args)

    def concat(self, *args):
        counts["concat"] += 1
        real_concat(self, *args)
        counts["concat_rows"].append(self.k_buf.shape[2])

    monkeypatch.setattr(layers_prefix, "fill_checked", write)
    monkeypatch.setattr(layers_prefix, "kv_append", append)
    monkeypatch.setattr(layers_prefix, "append_checked", append_checked)
    monkeypatch.setattr(layers_prefix.KVBuffer, "_replace", realloc)
    monkeypatch.setattr(layers_prefix.KVBuffer, "_concatenate", concat)
    return counts


def build(family: str, task: str | None = None, **config):
    base, default_task = make_model(family)
    task = task or default_task
    if task != default_task:
        model_config = copy.deepcopy(base.config)
        model_config.num_labels = 2
        torch.manual_seed(0)
        base = HEADS[(family, task)](model_config).eval()
    model = pk.get_peft_model(base, pk.PrefixTuningConfig(task_type=task, num_virtual_tokens=NVT, **config))
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=gen))
    return model


def run_forward(model, inputs):
    """(outputs, gradients of the trainable parameters) of one forward + backward."""
    model.zero_grad()
    out = model(**inputs)
    tensors = {
        n: getattr(out, n)
        for n in ("loss", "logits", "start_logits", "end_logits")
        if getattr(out, n, None) is not None
    }
    sum(t.float().pow(2).mean() for t in tensors.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach() for n, t in tensors.items()}, grads, out


# ---------------------------------------------------------------------------------------------- forward / grad
FORWARD_CASES = [
    ("llama", "CAUSAL_LM", {}),
    ("llama", "CAUSAL_LM", {"prefix_projection": True, "encoder_hidden_size": 16}),
    ("gpt2", "CAUSAL_LM", {}),
    ("opt", "CAUSAL_LM", {}),
    ("bloom", "CAUSAL_LM", {}),
    ("bert", "SEQ_CLS", {}),
    ("roberta", "TOKEN_CLS", {}),
    ("gpt2", "QUESTION_ANS", {}),
    ("llama", "SEQ_CLS", {}),
]


@pytest.mark.parametrize("family,task,config", FORWARD_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_forward_and_grads_equal_the_dynamic_cache(calls, family, task, config):
    model = build(family, task, **config)
    inputs = make_inputs(family)
    batch, length = inputs["input_ids"].shape
    if task == "CAUSAL_LM":
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        inputs["position_ids"] = torch.arange(length).expand(batch, -1)  # shifted by P inside, both paths
    elif task == "SEQ_CLS":
        inputs["labels"] = torch.tensor([0, 1])
    with cache_mode("dynamic"):
        expected, expected_grads, out = run_forward(model, inputs)
    assert calls["write"] == 0
    with cache_mode("fused"):
        got, grads, out = run_forward(model, inputs)
    # A forward that records autograd: every layer starts as the broadcast prefix and its one append is one
    # concatenation of P + T rows; no prefix write, no in-place append, no reallocation.
    num_layers = model.peft_config["default"].num_layers
    assert (calls["write"], calls["append"], calls["realloc"], calls["concat"]) == (0, 0, 0, num_layers)
    assert calls["concat_rows"] == [NVT + length] * num_layers
    if task == "CAUSAL_LM":
        assert isinstance(out.past_key_values, PrefixKVCache)
        assert out.past_key_values.get_seq_length() == NVT + length
    for name in expected:
        assert_close(got[name], expected[name], FP32_SAME_MATH, name)
    assert set(grads) == set(expected_grads)
    for name in expected_grads:
        assert_close(grads[name], expected_grads[name], FP32_SAME_MATH, name)


def test_paths_and_switch():
    llama = build("llama")
    assert isinstance(llama.get_prompt(2), PrefixKVCache)
    assert isinstance(llama.get_prompt(2), tf.DynamicCache)  # code that checks for a DynamicCache keeps working
    with cache_mode("dynamic"):
        assert type(llama.get_prompt(2)) is tf.DynamicCache
    with cache_mode("nonsense"), pytest.raises(ValueError, match="PEFT_KERNELS_PREFIX_CACHE"):
        llama.get_prompt(2)
    # Encoder-decoder models and Gemma-2/3/4 stay on the reference path.
    t5 = pk.get_peft_model(
        make_model("t5")[0], pk.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=NVT)
    )
    assert isinstance(t5.get_prompt(2), tf.EncoderDecoderCache)
    gemma = tf.Gemma2Config(
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8, hidden_size=16,
        intermediate_size=32, vocab_size=100, sliding_window=4,
    )  # fmt: skip
    prefix = torch.randn(2, 2, 1, NVT, 8)
    assert not isinstance(prefix_cache_builder.build_prefix_cache(prefix, 2, 1, gemma), PrefixKVCache)


# ---------------------------------------------------------------------------------------------- generation
GENERATE_CASES = {
    "greedy": dict(
        max_new_tokens=5, min_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True
    ),
    "beams": dict(max_new_tokens=4, num_beams=3, do_sample=False, output_scores=True, return_dict_in_generate=True),
    "sample": dict(max_new_tokens=4, do_sample=True, num_return_sequences=2, top_k=5),
    "max_length": dict(max_length=10, do_sample=False),
}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_equals_the_dynamic_cache(calls, family, case):
    model = build(family)
    inputs = make_inputs(family)  # one left-padded row
    kwargs = {**GENERATE_CASES[case], "pad_token_id": 0}
    results = {}
    for mode in ("dynamic", "fused"):
        torch.manual_seed(7)
        with cache_mode(mode):
            results[mode] = model.generate(**inputs, **kwargs)
    got, expected = results["fused"], results["dynamic"]
    if isinstance(got, torch.Tensor):
        assert torch.equal(got, expected)
    else:
        assert torch.equal(got.sequences, expected.sequences)
        assert len(got.scores) == len(expected.scores)
        for step, (a, b) in enumerate(zip(got.scores, expected.scores)):
            assert_close(a, b, FP32_SAME_MATH, f"scores[{step}]")
    # generate() planned the length: one allocation of P + max_length - 1 rows, never regrown.
    batch, length = inputs["input_ids"].shape
    new = kwargs.get("max_new_tokens", kwargs.get("max_length", 0) - length)
    expanded = batch * max(kwargs.get("num_beams", 1), kwargs.get("num_return_sequences", 1))
    assert calls["write"] == 1 and calls["realloc"] == 0
    assert calls["rows"] == [NVT + length + new - 1], (calls["rows"], expanded)


# ---------------------------------------------------------------------------------------------- protocol
def _prefix_and_caches(batch=2, max_cache_len=None, dtype=torch.float32, requires_grad=False):
    gen = torch.Generator().manual_seed(5)
    prefix = torch.randn(2, 2, 2, NVT, 8, generator=gen).to(dtype).requires_grad_(requires_grad)
    fused = PrefixKVCache(prefix, batch, max_cache_len)
    dynamic = tf.DynamicCache([(p[0].expand(batch, -1, -1, -1), p[1].expand(batch, -1, -1, -1)) for p in prefix])
    return prefix, fused, dynamic


def _same_state(fused, dynamic):
    assert fused.get_seq_length() == dynamic.get_seq_length()
    assert len(fused) == len(dynamic)
    for a, b in zip(fused.layers, dynamic.layers):
        assert a.get_seq_length() == b.get_seq_length()
        assert a.get_mask_sizes(3) == b.get_mask_sizes(3)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_cache_protocol_matches_dynamic_cache():
    """Crop, beam reorder, batch select / repeat, reset and growth past the plan on a Llama (RoPE, GQA)."""
    base = make_model("llama")[0]
    _, fused, dynamic = _prefix_and_caches(max_cache_len=NVT + 4)
    assert fused.get_max_length() == -1 and not fused.is_compileable and fused.is_croppable
    assert isinstance(fused.layers[0], PrefixKVLayer) and fused.layers[0].keys.shape == (2, 2, NVT, 8)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])

    def step(cache, tokens, width):
        with torch.no_grad():
            return base(input_ids=tokens, past_key_values=cache, attention_mask=torch.ones(2, width)).logits

    def both(tokens, width):
        a, b = step(fused, tokens, width), step(dynamic, tokens, width)
        assert_close(a, b, EXACT, "logits")
        _same_state(fused, dynamic)

    both(ids, NVT + 4)  # fills the plan exactly
    both(ids[:, :1], NVT + 5)  # past the plan: the buffers grow
    for cache in (fused, dynamic):
        cache.crop(-2)
    _same_state(fused, dynamic)
    both(ids[:, :3], NVT + 6)  # overwrites the cropped rows
    for cache in (fused, dynamic):
        cache.reorder_cache(torch.tensor([1, 1]))
    _same_state(fused, dynamic)
    both(ids[:, 1:2], NVT + 7)
    for cache in (fused, dynamic):
        cache.batch_repeat_interleave(2)
    _same_state(fused, dynamic)
    for cache in (fused, dynamic):
        cache.batch_select_indices(torch.tensor([3, 0]))
    _same_state(fused, dynamic)
    both(ids[:, 2:], NVT + 9)
    with pytest.raises(ValueError, match="positive value"):
        fused.crop(1)
    for cache in (fused, dynamic):
        cache.reset()
    assert fused.get_seq_length() == 0
    if dynamic.layers[0].keys is not None:
        # transformers < 5.18 zeroes a DynamicLayer's tensors on reset and keeps their length (5.18+ drops them, as
        # the fused cache does on every version): compare from an emptied DynamicCache there.
        dynamic = tf.DynamicCache()
    assert dynamic.get_seq_length() == 0
    both(ids, 4)  # an empty cache is sized by its first update


def test_two_forwards_with_gradients_on_one_cache():
    """A second forward that appends to a cache whose views the first one saved for backward: the write goes to a
    copy (copy-on-write), so both backwards work and the gradients equal the DynamicCache's."""
    base = make_model("llama")[0]
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    grads = {}
    for name in ("fused", "dynamic"):
        prefix, fused, dynamic = _prefix_and_caches(requires_grad=True, max_cache_len=NVT + 4)
        cache = fused if name == "fused" else dynamic
        first = base(input_ids=ids, past_key_values=cache, attention_mask=torch.ones(2, NVT + 4)).logits
        second = base(input_ids=ids[:, :2], past_key_values=cache, attention_mask=torch.ones(2, NVT + 6)).logits
        (first.pow(2).mean() + second.pow(2).mean()).backward()
        grads[name] = (first.detach(), second.detach(), prefix.grad)
    for got, expected in zip(grads["fused"], grads["dynamic"]):
        assert_close(got, expected, FP32_SAME_MATH, "two forwards")


def test_update_dtype_follows_torch_cat():
    """An update in a wider dtype promotes the cache (as torch.cat does); a narrower one is cast up."""
    _, fused, dynamic = _prefix_and_caches(dtype=torch.bfloat16)
    wide = torch.randn(2, 2, 3, 8, dtype=torch.float32)
    for cache in (fused, dynamic):
        keys, values = cache.update(wide, 2 * wide, 0)
        assert keys.dtype == torch.float32 and keys.shape == (2, 2, NVT + 3, 8)
    _same_state(fused, dynamic)
    narrow = torch.randn(2, 2, 1, 8, dtype=torch.bfloat16)
    for cache in (fused, dynamic):
        assert cache.update(narrow, narrow, 0)[0].dtype == torch.float32
    _same_state(fused, dynamic)
    with pytest.raises(ValueError, match="do not extend"):
        fused.update(torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8), 1)  # batch 3 into a batch-2 cache
