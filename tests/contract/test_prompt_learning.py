"""docs/PEFT_CONTRACT.md §8 (and §12 rows 13, 14, 21, 25-33): prefix tuning, P-tuning and prompt tuning.

Oracle rows compare with real peft 0.21.2 on the same tiny models (same seed, encoder and head weights copied
through ``load_state_dict``, which also checks that the model-side key sets are identical). Generation is
compared with the base model fed the virtual tokens by hand, because PEFT's own generation mechanics are wrong
on recent transformers (§8.5).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import warnings

import pytest
import torch
import transformers as tf
from _models import make_inputs, make_model
from _tolerances import EXACT, FP32_SAME_MATH, assert_close
from safetensors.torch import load_file

import peft_kernels as pk
from peft_kernels.tuners.prefix_cache_builder import seq2seq_layer_slots

NVT = 3

# Task heads per family (the family's default task comes from tests/_models.py).
HEADS = {
    "gpt2": dict(SEQ_CLS=tf.GPT2ForSequenceClassification, TOKEN_CLS=tf.GPT2ForTokenClassification,
                 QUESTION_ANS=tf.GPT2ForQuestionAnswering, FEATURE_EXTRACTION=tf.GPT2Model),
    "llama": dict(SEQ_CLS=tf.LlamaForSequenceClassification, TOKEN_CLS=tf.LlamaForTokenClassification,
                  QUESTION_ANS=tf.LlamaForQuestionAnswering, FEATURE_EXTRACTION=tf.LlamaModel),
    "opt": dict(SEQ_CLS=tf.OPTForSequenceClassification, QUESTION_ANS=tf.OPTForQuestionAnswering,
                FEATURE_EXTRACTION=tf.OPTModel),
    "bloom": dict(SEQ_CLS=tf.BloomForSequenceClassification, TOKEN_CLS=tf.BloomForTokenClassification,
                  QUESTION_ANS=tf.BloomForQuestionAnswering, FEATURE_EXTRACTION=tf.BloomModel),
    "t5": {},
    "bart": {},
    "bert": dict(TOKEN_CLS=tf.BertForTokenClassification, QUESTION_ANS=tf.BertForQuestionAnswering,
                 FEATURE_EXTRACTION=tf.BertModel),
    "roberta": dict(TOKEN_CLS=tf.RobertaForTokenClassification, QUESTION_ANS=tf.RobertaForQuestionAnswering,
                    FEATURE_EXTRACTION=tf.RobertaModel),
}  # fmt: skip
FAMILY_TASKS = [(family, make_model(family)[1]) for family in HEADS] + [
    (family, task) for family, heads in HEADS.items() for task in heads
]

# name -> (config class name, extra kwargs)
METHODS = {
    "prefix": ("PrefixTuningConfig", {}),
    "prefix_proj": ("PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 16}),
    "prompt": ("PromptTuningConfig", {}),
    "ptuning": ("PromptEncoderConfig", {"encoder_hidden_size": 16}),
    "ptuning_lstm": ("PromptEncoderConfig", {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8}),
}
BASIC_METHODS = ["prefix", "prompt", "ptuning"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tensors here are tiny: intra-op threads only add synchronisation, which on a shared 2-core machine made
    # each forward ~20x slower (0.6 s vs 0.03 s measured for a tiny GPT-2).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


def build(family: str, task: str, seed: int = 0):
    """Tiny model of ``family`` with the ``task`` head, eval mode; same seed → same weights."""
    base, default_task = make_model(family, seed)
    if task == default_task:
        return base
    config = copy.deepcopy(base.config)
    if task == "QUESTION_ANS":
        config.num_labels = 2
    torch.manual_seed(seed)
    return HEADS[family][task](config).eval()


def make_config(lib, method: str, task: str, **extra):
    cls_name, kwargs = METHODS[method]
    return getattr(lib, cls_name)(task_type=task, **{"num_virtual_tokens": NVT, **kwargs, **extra})


def task_inputs(family: str, task: str, method: str) -> dict:
    """make_inputs (one left-padded row) + labels, token types and positions where the task takes them."""
    inputs = make_inputs(family)
    input_ids = inputs["input_ids"]
    batch, length = input_ids.shape
    if task == "CAUSAL_LM":
        inputs["labels"] = input_ids.masked_fill(inputs["attention_mask"] == 0, -100)
        if family in ("gpt2", "llama"):
            inputs["position_ids"] = torch.arange(length).expand(batch, -1)
    elif task == "SEQ_2_SEQ_LM":
        inputs["labels"] = torch.tensor([[5, 6, 7], [8, 9, 10]])
        inputs["decoder_attention_mask"] = torch.ones(batch, 3, dtype=torch.long)
    elif task == "SEQ_CLS":
        inputs["labels"] = torch.tensor([0, 1])
    elif task == "TOKEN_CLS" and method.startswith("prefix"):
        inputs["labels"] = torch.ones(batch, length, dtype=torch.long)  # prompt methods output P + T positions
    elif task == "QUESTION_ANS":
        inputs["start_positions"], inputs["end_positions"] = torch.tensor([1, 2]), torch.tensor([3, 4])
    if family == "bert" and task in ("SEQ_CLS", "TOKEN_CLS"):
        inputs["token_type_ids"] = (torch.arange(length) >= 2).long().expand(batch, -1)
    return inputs


def outputs_of(output) -> dict[str, torch.Tensor]:
    names = ("loss", "logits", "start_logits", "end_logits", "last_hidden_state")
    return {n: getattr(output, n) for n in names if getattr(output, n, None) is not None}


def objective(output) -> torch.Tensor:
    return sum(t.float().pow(2).mean() for t in outputs_of(output).values())


def perturb_trainable(model, scale: float = 0.1) -> None:
    """Moves every trainable tensor (encoder, modules_to_save copies) away from its initial value."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=gen))


def for_peft(model):
    """``model`` with ``past_key_values`` restored on forwards that call it ``cache`` (transformers >= 5.24).

    peft 0.21.2 looks for the literal ``past_key_values`` in the forward signatures and raises for SEQ_CLS /
    TOKEN_CLS / QA prefix tuning when only ``cache`` exists (docs/PEFT_CONTRACT.md §10). Renaming the argument by hand
    keeps PEFT's own computation as the oracle on every transformers version; on 5.23 this is a no-op.
    """
    from transformers import PreTrainedModel

    modules = [model] + [m for m in model.children() if isinstance(m, PreTrainedModel)]
    for module in modules:
        params = inspect.signature(module.forward).parameters
        if "cache" in params and "past_key_values" not in params:
            original = module.forward

            def forward(*args, past_key_values=None, __original=original, **kwargs):
                if past_key_values is not None:
                    kwargs["cache"] = past_key_values
                return __original(*args, **kwargs)

            module.forward = forward
    return model


def synced_pair(peft, family: str, task: str, method: str, **extra):
    """(peft 0.21.2 model, peft_kernels model) with identical weights; asserts identical state_dict keys."""
    theirs = peft.get_peft_model(for_peft(build(family, task)), make_config(peft, method, task, **extra))
    ours = pk.get_peft_model(build(family, task), make_config(pk, method, task, **extra))
    perturb_trainable(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def printed(fn) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        fn()
    return buffer.getvalue()


# ---------------------------------------------------------------------------- forward and gradient vs PEFT
FORWARD_CASES = [(f, t, m) for f, t in FAMILY_TASKS for m in BASIC_METHODS] + [
    ("gpt2", "CAUSAL_LM", "prefix_proj"),
    ("gpt2", "CAUSAL_LM", "ptuning_lstm"),
    ("llama", "CAUSAL_LM", "prefix_proj"),
    ("t5", "SEQ_2_SEQ_LM", "prefix_proj"),
    ("t5", "SEQ_2_SEQ_LM", "ptuning_lstm"),
    ("bert", "SEQ_CLS", "ptuning_lstm"),
]


@pytest.mark.oracle
@pytest.mark.parametrize("family,task,method", FORWARD_CASES)
def test_forward_and_grad_match_peft(peft, family, task, method):
    theirs, ours = synced_pair(peft, family, task, method)
    assert type(ours).__name__ == type(theirs).__name__
    assert ours.peft_config["default"].to_dict() == {
        **theirs.peft_config["default"].to_dict(),
        "peft_version": ours.peft_config["default"].peft_version,
    }
    assert printed(ours.print_trainable_parameters) == printed(theirs.print_trainable_parameters)
    inputs = task_inputs(family, task, method)

    out_theirs, out_ours = theirs(**inputs), ours(**inputs)
    expected = outputs_of(out_theirs)
    got = outputs_of(out_ours)
    assert set(got) == set(expected)
    for name in expected:
        assert_close(got[name], expected[name], FP32_SAME_MATH, name)

    objective(out_theirs).backward()
    objective(out_ours).backward()
    grads_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    grads_ours = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(grads_ours) == set(grads_theirs)
    assert all(g is not None for g in grads_ours.values())
    for name, grad in grads_theirs.items():
        assert_close(grads_ours[name], grad, FP32_SAME_MATH, name)
    # The base model stays frozen: no gradient outside the encoder and the modules_to_save copies.
    assert all(p.grad is None for n, p in ours.named_parameters() if not p.requires_grad)


# ---------------------------------------------------------------------------- checkpoints vs PEFT
CHECKPOINT_CASES = [
    ("gpt2", "CAUSAL_LM", "prefix"),
    ("gpt2", "CAUSAL_LM", "prefix_proj"),
    ("gpt2", "CAUSAL_LM", "prompt"),
    ("gpt2", "CAUSAL_LM", "ptuning"),
    ("gpt2", "CAUSAL_LM", "ptuning_lstm"),
    ("llama", "CAUSAL_LM", "prefix"),
    ("t5", "SEQ_2_SEQ_LM", "prefix"),
    ("t5", "SEQ_2_SEQ_LM", "ptuning"),
    ("bart", "SEQ_2_SEQ_LM", "prompt"),
    ("bert", "SEQ_CLS", "prefix"),
    ("bert", "SEQ_CLS", "prompt"),
    ("roberta", "TOKEN_CLS", "ptuning"),
]


@pytest.mark.oracle
@pytest.mark.parametrize("family,task,method", CHECKPOINT_CASES)
def test_checkpoint_both_ways_with_peft(peft, tmp_path, family, task, method):
    theirs, ours = synced_pair(peft, family, task, method)
    inputs = task_inputs(family, task, method)
    with torch.no_grad():
        ref = outputs_of(ours(**inputs))
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")

    json_theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    json_ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    json_theirs.pop("peft_version"), json_ours.pop("peft_version")
    assert json_ours == json_theirs
    tensors_theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    tensors_ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(tensors_ours) == set(tensors_theirs)
    for key, tensor in tensors_theirs.items():
        assert_close(tensors_ours[key], tensor, FP32_SAME_MATH, key)

    # peft_kernels checkpoint → peft, and peft checkpoint → peft_kernels: same outputs as the trained model.
    loaded_by_peft = peft.PeftModel.from_pretrained(for_peft(build(family, task)), tmp_path / "ours")
    loaded_by_us = pk.PeftModel.from_pretrained(build(family, task), tmp_path / "theirs")
    assert type(loaded_by_us).__name__ == type(loaded_by_peft).__name__
    with torch.no_grad():
        for loaded in (loaded_by_peft, loaded_by_us):
            got = outputs_of(loaded(**inputs))
            for name in ref:
                assert_close(got[name], ref[name], FP32_SAME_MATH, name)


@pytest.mark.parametrize("method", ["prefix_proj", "ptuning_lstm", "prompt"])
def test_save_load_roundtrip(tmp_path, method):
    model = pk.get_peft_model(build("gpt2", "CAUSAL_LM"), make_config(pk, method, "CAUSAL_LM"))
    inputs = task_inputs("gpt2", "CAUSAL_LM", method)
    with torch.no_grad():
        ref = model(**inputs).logits
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Cannot set a prompt learning adapter to trainable"):
        pk.PeftModel.from_pretrained(build("gpt2", "CAUSAL_LM"), tmp_path, is_trainable=True)
    loaded = pk.PeftModel.from_pretrained(build("gpt2", "CAUSAL_LM"), tmp_path)
    assert loaded.peft_config["default"].inference_mode
    # Inference mode keeps only the embedding, holding the saved encoder output.
    assert [n for n, _ in loaded.prompt_encoder["default"].named_children()] == ["embedding"]
    with torch.no_grad():
        assert_close(loaded(**inputs).logits, ref, EXACT, "reloaded logits")


# ---------------------------------------------------------------------------- disable / adapters
@pytest.mark.parametrize(
    "family,task,method",
    [("gpt2", "CAUSAL_LM", "prefix"), ("llama", "CAUSAL_LM", "prompt"), ("t5", "SEQ_2_SEQ_LM", "prefix"),
     ("bert", "SEQ_CLS", "ptuning"), ("gpt2", "QUESTION_ANS", "prefix")],
)  # fmt: skip
def test_disable_adapter_equals_base(family, task, method):
    # Frozen like the PeftModel's base: transformers' generate() takes other kernels for trainable weights.
    pristine = build(family, task).requires_grad_(False)
    model = pk.get_peft_model(build(family, task), make_config(pk, method, task))
    perturb_trainable(model, scale=1.0)  # includes the SEQ_CLS head copy: disabled must use the original head
    inputs = task_inputs(family, task, method)
    inputs.pop("position_ids", None)
    with torch.no_grad():
        adapted = outputs_of(model(**inputs))
        base_out = outputs_of(pristine(**inputs))
        with model.disable_adapter():
            with model.disable_adapter():
                inner = outputs_of(model(**inputs))
            disabled = outputs_of(model(**inputs))
        after = outputs_of(model(**inputs))
    for name in base_out:
        assert_close(inner[name], base_out[name], EXACT, name)
        assert_close(disabled[name], base_out[name], EXACT, name)
        assert_close(after[name], adapted[name], EXACT, name)
    assert not model._adapters_disabled

    if task == "CAUSAL_LM":
        gen = dict(max_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        ids = inputs["input_ids"]
        with model.disable_adapter():
            got = model.generate(input_ids=ids, attention_mask=inputs["attention_mask"], **gen)
        expected = pristine.generate(input_ids=ids, attention_mask=inputs["attention_mask"], **gen)
        assert torch.equal(got.sequences, expected.sequences)
        assert_close(got.scores[0], expected.scores[0], EXACT, "scores[0]")


def test_multiple_adapters_set_delete_load(tmp_path):
    model = pk.get_peft_model(build("bert", "SEQ_CLS"), make_config(pk, "prefix", "SEQ_CLS"))
    perturb_trainable(model)
    inputs = task_inputs("bert", "SEQ_CLS", "prefix")
    with torch.no_grad():
        out_default = model(**inputs).logits

    with pytest.raises(ValueError, match="Adapter with name 'default' already exists."):
        model.add_adapter("default", make_config(pk, "prefix", "SEQ_CLS"))
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        model.add_adapter("lora", pk.LoraConfig(task_type="SEQ_CLS"))
    model.add_adapter("other", make_config(pk, "prefix", "SEQ_CLS"))
    assert model.active_adapter == "default"
    head = model.base_model.classifier
    assert set(head.modules_to_save) == {"default", "other"}
    assert head.modules_to_save["default"].weight.requires_grad
    assert not head.modules_to_save["other"].weight.requires_grad
    with torch.no_grad():
        assert_close(model(**inputs).logits, out_default, EXACT, "after add_adapter")
        model.set_adapter("other")
        out_other = model(**inputs).logits
        assert not torch.allclose(out_other, out_default)
        model.set_adapter("default")
        assert_close(model(**inputs).logits, out_default, EXACT, "switched back")
    with pytest.raises(ValueError, match="Adapter nope not found."):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="Adapter nope does not exist"):
        model.delete_adapter("nope")

    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="Adapter default was active which is now deleted"):
        model.delete_adapter("default")
    assert model.active_adapter == "other"
    assert list(model.prompt_encoder) == ["other"] and list(model.prompt_tokens) == ["other"]
    assert set(head.modules_to_save) == {"other"} and "default" not in model.peft_config
    with torch.no_grad():
        assert_close(model(**inputs).logits, out_other, EXACT, "after delete")

    # Load the saved "default" back under a new name: not activated, then identical when activated.
    model.load_adapter(tmp_path, "restored")
    assert model.active_adapter == "other"
    model.set_adapter("restored")
    with torch.no_grad():
        assert_close(model(**inputs).logits, out_default, FP32_SAME_MATH, "restored adapter")


# ---------------------------------------------------------------------------- structure and derived fields
def test_derived_fields_and_gqa_prefix_cache():
    model = pk.get_peft_model(make_model("llama")[0], make_config(pk, "prefix", "CAUSAL_LM"))
    config = model.peft_config["default"]
    # hidden 32, 4 heads, 2 KV heads: head_dim 8 → the prefix holds 2 KV heads, token_dim = 16.
    assert (config.num_layers, config.token_dim, config.num_attention_heads) == (2, 16, 2)
    assert (config.encoder_hidden_size, config.num_transformer_submodules) == (16, 1)
    cache = model.get_prompt(3)
    assert isinstance(cache, tf.DynamicCache) and cache.get_seq_length() == NVT
    assert cache.layers[0].keys.shape == (3, 2, NVT, 8)
    assert model.prompt_encoder["default"].embedding.weight.shape == (NVT, 2 * 2 * 16)
    assert model.transformer_backbone_name == "model"
    assert model.word_embeddings is model.base_model.model.embed_tokens
    assert all(not p.requires_grad for p in model.base_model.parameters())


def test_seq2seq_prefix_cache_slots():
    """T5: decoder layer i reads prefix layer 2i mod L; the cross-attention cache starts empty."""
    model = pk.get_peft_model(make_model("t5")[0], make_config(pk, "prefix", "SEQ_2_SEQ_LM"))
    config = model.peft_config["default"]
    assert config.num_transformer_submodules == 2
    cache = model.get_prompt(2)
    assert isinstance(cache, tf.EncoderDecoderCache)
    assert cache.get_seq_length() == NVT and cache.cross_attention_cache.get_seq_length() == 0
    assert cache.is_updated == {0: False, 1: False}
    flat = model.get_prompt_embedding_to_save("default")  # [P, L·2·D]
    per_layer = flat.view(NVT, config.num_layers, 2, config.num_attention_heads, -1).permute(1, 2, 3, 0, 4)
    for layer, slot in enumerate(seq2seq_layer_slots(config.num_layers)):
        assert slot == (2 * layer) % config.num_layers
        assert torch.equal(cache.self_attention_cache.layers[layer].keys[1], per_layer[slot, 0])
        assert torch.equal(cache.self_attention_cache.layers[layer].values[0], per_layer[slot, 1])


@pytest.mark.parametrize(
    "method,expected",
    [("prefix", 640), ("prefix_proj", 2864), ("ptuning", 1504), ("ptuning_lstm", 15072)],
)
def test_encoder_parameter_counts(method, expected):
    """GPT-2 tiny, L=2, D=32, P=5, encoder_hidden_size=16 (docs/PEFT_CONTRACT.md §8.2)."""
    config = make_config(pk, method, "CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=16)
    model = pk.get_peft_model(make_model("gpt2")[0], config)
    assert sum(p.numel() for p in model.prompt_encoder.parameters()) == expected
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected and total == expected + sum(p.numel() for p in model.base_model.parameters())


def test_prefix_positions_offset_and_inputs_embeds():
    model = pk.get_peft_model(make_model("llama")[0], make_config(pk, "prefix", "CAUSAL_LM"))
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        implicit = model(input_ids=input_ids).logits
        explicit = model(input_ids=input_ids, position_ids=torch.arange(4)[None]).logits  # shifted by P inside
        embeds = model(inputs_embeds=model.word_embeddings(input_ids)).logits
    assert implicit.shape == (1, 4, 100)
    assert_close(explicit, implicit, EXACT, "explicit position ids")
    assert_close(embeds, implicit, FP32_SAME_MATH, "inputs_embeds")


def test_prompt_tuning_causal_lm_labels_and_mask():
    model = pk.get_peft_model(make_model("gpt2")[0], make_config(pk, "prompt", "CAUSAL_LM"))
    inputs = task_inputs("gpt2", "CAUSAL_LM", "prompt")
    with pytest.warns(UserWarning, match="Position ids are not supported"):
        out = model(**inputs)
    assert out.logits.shape == (2, NVT + 5, 100)
    # Label j is predicted at position j - 1: the first real token by the last virtual one.
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, NVT - 1 : -1].reshape(-1, 100), inputs["labels"].reshape(-1), ignore_index=-100
    )
    assert_close(out.loss, expected, FP32_SAME_MATH, "loss")


def test_seq_cls_inputs_embeds_equals_input_ids():
    model = pk.get_peft_model(build("bert", "SEQ_CLS"), make_config(pk, "prompt", "SEQ_CLS"))
    inputs = make_inputs("bert")
    with torch.no_grad():
        by_ids = model(**inputs).logits
        by_embeds = model(
            inputs_embeds=model.word_embeddings(inputs["input_ids"]), attention_mask=inputs["attention_mask"]
        ).logits
    assert_close(by_embeds, by_ids, FP32_SAME_MATH, "inputs_embeds")


def test_cache_keyword_detection():
    """transformers 5.24 renames the forward keyword to ``cache``: it is passed under the declared name."""

    class CacheLM(tf.GPT2LMHeadModel):
        def forward(self, input_ids=None, cache=None, attention_mask=None, **kwargs):
            assert "past_key_values" not in kwargs
            return super().forward(input_ids=input_ids, past_key_values=cache, attention_mask=attention_mask, **kwargs)

    class CacheBert(tf.BertModel):
        def forward(self, input_ids=None, cache=None, **kwargs):
            assert "past_key_values" not in kwargs
            return super().forward(input_ids=input_ids, past_key_values=cache, **kwargs)

    for family, task, patch in [("gpt2", "CAUSAL_LM", None), ("bert", "SEQ_CLS", "bert")]:
        plain = pk.get_peft_model(build(family, task), make_config(pk, "prefix", task))
        renamed = pk.get_peft_model(build(family, task), make_config(pk, "prefix", task))
        if patch is None:
            renamed.base_model.__class__ = CacheLM
        else:
            getattr(renamed.base_model, patch).__class__ = CacheBert
        renamed.load_state_dict(plain.state_dict())
        inputs = make_inputs(family)
        with torch.no_grad():
            assert_close(renamed(**inputs).logits, plain(**inputs).logits, EXACT, family)


# ---------------------------------------------------------------------------- prompt tuning init
def _word_level_tokenizer(path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = Tokenizer(WordLevel({"[UNK]": 0, "[PAD]": 1, "hello": 3, "world": 4}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)
    return str(path)


def test_prompt_tuning_text_and_sample_vocab_init(tmp_path):
    base = make_model("gpt2")[0]
    words = base.get_input_embeddings().weight.detach().clone()
    config = pk.PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=5,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="hello world",
        tokenizer_name_or_path=_word_level_tokenizer(tmp_path / "tok"),
        tokenizer_kwargs={"trust_remote_code": True},
    )
    model = pk.get_peft_model(base, config)
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, words[[3, 4, 3, 4, 3]])
    assert config.tokenizer_kwargs == {}  # trust_remote_code never reaches the tokenizer or the saved config

    model = pk.get_peft_model(
        make_model("gpt2")[0],
        pk.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"),
    )
    rows = model.prompt_encoder["default"].embedding.weight
    assert rows.dtype == torch.float32
    assert all(any(torch.equal(row, word) for word in words) for row in rows)
    with pytest.raises(ValueError, match="tokenizer_name_or_path can't be None"):
        pk.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="x"
        )


# ---------------------------------------------------------------------------- errors
def test_errors():
    # PEFT raises KeyError: None here; we name the missing field (issue #18, README "differs" table).
    with pytest.raises(ValueError, match="needs a task_type"):
        pk.get_peft_model(make_model("gpt2")[0], pk.PrefixTuningConfig(num_virtual_tokens=NVT))
    for nvt in (None, 0, -2):
        with pytest.raises(ValueError, match="num_virtual_tokens"):
            pk.get_peft_model(
                make_model("gpt2")[0], pk.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=nvt)
            )

    checkpointed = make_model("gpt2")[0]
    checkpointed.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="^PREFIX_TUNING does not work with gradient checkpointing.$"):
        pk.get_peft_model(checkpointed, make_config(pk, "prefix", "CAUSAL_LM"))
    assert all(p.requires_grad for p in checkpointed.parameters())  # rolled back

    with pytest.raises(ValueError, match="^Prompt encoder type not recognized. Please use one of MLP"):
        pk.get_peft_model(
            make_model("gpt2")[0], make_config(pk, "ptuning", "CAUSAL_LM", encoder_reparameterization_type="GRU")
        )
    with pytest.warns(
        UserWarning, match="the argument `encoder_num_layers` is ignored. Exactly 2 MLP layers are used."
    ):
        pk.get_peft_model(make_model("gpt2")[0], make_config(pk, "ptuning", "CAUSAL_LM", encoder_num_layers=3))

    model = pk.get_peft_model(make_model("gpt2")[0], make_config(pk, "prompt", "CAUSAL_LM"))
    with pytest.raises(ValueError, match="^You have to provide either input_ids or inputs_embeds$"):
        model(attention_mask=torch.ones(1, 2))
    with pytest.raises(TypeError, match="not supported for prompt learning"):
        model.set_requires_grad("default")
    with pytest.raises(AttributeError):
        model.unload()

    deberta = pk.get_peft_model(make_model("deberta-v2")[0], make_config(pk, "prefix", "SEQ_CLS"))
    with pytest.raises(
        ValueError, match="^Model does not support past key values which are required for prefix tuning.$"
    ):
        deberta(**make_inputs("deberta-v2"))
