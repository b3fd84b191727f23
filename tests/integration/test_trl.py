"""Issue #13: TRL 1.16's trainers on peft_kernels, with tiny Llamas built from configs, on CPU.

Two routes. ``patch_peft()`` + a trainer that calls ``peft`` itself (``peft_config=peft.LoraConfig(...)``), and
the native route (``model=<peft_kernels PeftModel>``). Each test trains a few steps and checks that the loss on
the training data is lower afterwards, that the adapter the trained model saves loads in plain (unpatched) peft
with the same logits, and, for LoRA, that the profiler saw ``peft_kernels::lora_linear_fwd`` and ``_bwd`` for
every LoRA layer at every step: the reference backend is forced (``PEFT_KERNELS_BACKEND=reference``), so every
call of the fused op goes through ``torch.ops.peft_kernels`` and is recorded.
"""

import warnings

import pytest
import torch
from _models import logits_of, make_model
from _tolerances import FP32_SAME_MATH, assert_close

import peft_kernels as pk
from peft_kernels.integration.hf_peft import is_patched

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.oracle

STEPS = 3
TEXTS = ["t5 t6 t7 t8 t9 t10 t11 t12", "t20 t21 t22 t23 t24 t25 t26"] * 4
INPUTS = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10], [20, 21, 22, 23, 24, 25]])}


@pytest.fixture(autouse=True)
def _quiet_and_reference_backend(monkeypatch):
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def patched():
    assert pk.patch_peft()
    yield
    pk.unpatch_peft()


def tokenizer():
    """A word-level tokenizer over the tiny models' 100 ids: "t5 t6" → [5, 6]."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 100)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def args(config_cls, tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=STEPS,
        learning_rate=5e-2,
        gradient_checkpointing=False,  # SFTConfig's default is True; the tests that want it say so
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return config_cls(**{**defaults, **kwargs})


PREFIX_CONCAT = "KVBuffer._concatenate"


def train_profiled(trainer) -> dict[str, int]:
    """Trains; returns {profiler event name: count} over the whole run, plus under ``PREFIX_CONCAT`` the layers
    whose prefix cache was built by peft_kernels' training route (``KVBuffer._concatenate``, plain Python)."""
    from peft_kernels.layers.prefix import KVBuffer

    concatenations = 0
    real_concatenate = KVBuffer._concatenate

    def counted(self, *args):
        nonlocal concatenations
        concatenations += 1
        return real_concatenate(self, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KVBuffer, "_concatenate", counted)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            trainer.train()
    return {**{event.key: event.count for event in prof.key_averages()}, PREFIX_CONCAT: concatenations}


def assert_prefix_cache_every_step(model, counts):
    """Every training forward built its K/V cache on peft_kernels' route: one concatenation per layer."""
    layers = model.peft_config["default"].num_layers
    assert counts[PREFIX_CONCAT] >= STEPS * layers and counts[PREFIX_CONCAT] % layers == 0, counts[PREFIX_CONCAT]


def train_and_check_loss(trainer, eval_dataset=None) -> dict[str, int]:
    before = trainer.evaluate(eval_dataset)["eval_loss"]
    counts = train_profiled(trainer)
    after = trainer.evaluate(eval_dataset)["eval_loss"]
    assert after < before, f"loss on the training data went from {before} to {after}"
    return counts


def lora_linear_layers(model):
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    from peft_kernels.layers.lora import Linear

    return [m for m in model.modules() if isinstance(m, (Linear, PeftLoraLayer)) and hasattr(m, "lora_A")]


def assert_fused_every_step(model, counts, steps=STEPS, forwards_per_step=1):
    """Every LoRA layer is on peft_kernels' class and every forward/backward of the run called the op per layer."""
    layers = lora_linear_layers(model)
    assert layers
    assert all(is_patched(m) or type(m).__module__.startswith("peft_kernels.layers") for m in layers)
    for op, per_step in (("lora_linear_fwd", forwards_per_step), ("lora_linear_bwd", 1)):
        calls = counts.get(f"peft_kernels::{op}", 0)
        assert calls >= steps * per_step * len(layers) and calls % len(layers) == 0, (op, calls, len(layers))


def assert_loads_in_plain_peft(model, tmp_path):
    """The trained adapter, saved, loads in unpatched peft on a fresh base with the trained model's logits."""
    model.save_pretrained(tmp_path / "adapter")
    pk.unpatch_peft()
    loaded = peft.PeftModel.from_pretrained(make_model("llama")[0], tmp_path / "adapter")
    assert not any(is_patched(m) for m in loaded.modules())
    model.eval()
    with torch.no_grad():
        assert_close(logits_of(loaded(**INPUTS)), logits_of(model(**INPUTS)), FP32_SAME_MATH, "plain peft reload")


def sft(model, tmp_path, peft_config=None, **config):
    dataset = datasets.Dataset.from_dict({"text": TEXTS})
    return trl.SFTTrainer(
        model=model,
        args=args(trl.SFTConfig, tmp_path, **config),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer(),
        peft_config=peft_config,
    )


# ---------------------------------------------------------------------------- patch_peft() + peft_config=
@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["dropout", "gradient_checkpointing"])
def test_sft_peft_config_lora(patched, tmp_path, gradient_checkpointing):
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.05)
    trainer = sft(make_model("llama")[0], tmp_path, config, gradient_checkpointing=gradient_checkpointing)
    assert isinstance(trainer.model, peft.PeftModel)
    counts = train_and_check_loss(trainer)
    # Checkpointing recomputes each forward in backward: twice the forward calls.
    assert_fused_every_step(trainer.model, counts, forwards_per_step=2 if gradient_checkpointing else 1)
    assert_loads_in_plain_peft(trainer.model, tmp_path)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_sft_peft_config_prompt_learning(patched, tmp_path, method):
    if method == "prompt_tuning":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    else:
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    trainer = sft(make_model("llama")[0], tmp_path, config)
    counts = train_and_check_loss(trainer)
    if method == "prefix_tuning":
        assert_prefix_cache_every_step(trainer.model, counts)
    assert_loads_in_plain_peft(trainer.model, tmp_path)


def dpo(model, tmp_path, peft_config=None):
    pairs = datasets.Dataset.from_dict(
        {"prompt": ["t5 t6 t7", "t20 t21 t22"] * 4, "chosen": ["t8 t9"] * 8, "rejected": ["t30 t31"] * 8}
    )
    return trl.DPOTrainer(
        model=model,
        ref_model=None,
        args=args(trl.DPOConfig, tmp_path),
        train_dataset=pairs,
        eval_dataset=pairs,
        processing_class=tokenizer(),
        peft_config=peft_config,
    )


def held_parameters(trainer) -> int:
    modules = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    unique = {id(p): p for module in modules for p in module.parameters()}
    return sum(p.numel() for p in unique.values())


def count_calls(monkeypatch, cls, name):
    """Counts calls of ``cls.name`` (a method) from now on; returns the list of their first arguments."""
    calls = []
    method = getattr(cls, name)

    def counting(self, *args, **kwargs):
        calls.append(args[0] if args else None)
        return method(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counting)
    return calls


def test_dpo_peft_config_reference_is_the_adapter_disabled(patched, tmp_path, monkeypatch):
    base_parameters = sum(p.numel() for p in make_model("llama")[0].parameters())
    trainer = dpo(make_model("llama")[0], tmp_path, peft.LoraConfig(task_type="CAUSAL_LM", r=4))
    adapter_parameters = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert trainer.ref_model is None
    assert held_parameters(trainer) == base_parameters + adapter_parameters, "no second copy of the base"
    disabled = count_calls(monkeypatch, type(trainer.model), "disable_adapter")
    counts = train_and_check_loss(trainer)
    assert len(disabled) >= STEPS, "reference log-probs come from the model with its adapter disabled"
    assert_fused_every_step(trainer.model, counts)
    assert_loads_in_plain_peft(trainer.model, tmp_path)


def test_dpo_native_reference_is_a_frozen_adapter_copy(tmp_path, monkeypatch):
    """TRL 1.16 gives a PeftModel passed in (PEFT's or ours) a frozen "ref" copy of its adapter as the reference
    (dpo_trainer.py: ``model.add_adapter("ref", ...)``): still no second base model, only a second adapter."""
    base_parameters = sum(p.numel() for p in make_model("llama")[0].parameters())
    model = pk.get_peft_model(make_model("llama")[0], pk.LoraConfig(task_type="CAUSAL_LM", r=4))
    adapter_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = dpo(model, tmp_path)
    assert trainer.model is model and trainer.ref_model is None
    assert held_parameters(trainer) == base_parameters + 2 * adapter_parameters, "no second copy of the base"
    reference = {n: p.detach().clone() for n, p in model.named_parameters() if ".ref." in n}
    assert len(reference) == len([n for n, p in model.named_parameters() if ".default." in n])
    switched = count_calls(monkeypatch, type(model), "set_adapter")
    counts = train_and_check_loss(trainer)
    assert switched.count("ref") >= STEPS, "reference log-probs come from the ref adapter"
    for name, param in model.named_parameters():
        if name in reference:
            assert torch.equal(param, reference[name]), f"the reference adapter stays frozen: {name}"
    assert_fused_every_step(model, counts)
    model.delete_adapter("ref")
    assert_loads_in_plain_peft(model, tmp_path)


# ---------------------------------------------------------------------------- native route
@pytest.mark.parametrize("method", ["lora", "prefix_tuning"])
def test_sft_native_peft_model(tmp_path, method):
    if method == "lora":
        config = pk.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.05)
    else:
        config = pk.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = pk.get_peft_model(make_model("llama")[0], config)
    trainer = sft(model, tmp_path)
    assert trainer.model is model, "TRL recognised the PeftModel and kept it"
    counts = train_and_check_loss(trainer)
    if method == "lora":
        assert_fused_every_step(model, counts)
    else:
        assert_prefix_cache_every_step(model, counts)
    assert_loads_in_plain_peft(model, tmp_path)


# ---------------------------------------------------------------------------- GRPO
def test_grpo_two_steps(patched, tmp_path):
    """GRPO with a toy reward (minus the mean token id of the completion). Its loss is not a progress measure (zero-mean
    advantages make it ~0 at every on-policy step), so this checks that it trains on the fused layers: two
    steps run, the adapter moved, the op ran for every layer, the adapter reloads in plain peft."""

    def reward(completions, **kwargs):
        # Continuous, so the 4 sampled completions of a prompt differ in reward: GRPO's advantages are not all 0.
        return [-sum(int(t[1:]) for t in text.split() if t[1:].isdigit()) / 100 for text in completions]

    trainer = trl.GRPOTrainer(
        model=make_model("llama")[0],
        reward_funcs=reward,
        args=args(trl.GRPOConfig, tmp_path, max_steps=2, num_generations=4, max_completion_length=4),
        train_dataset=datasets.Dataset.from_dict({"prompt": ["t5 t6", "t20 t21"] * 4}),
        processing_class=tokenizer(),
        peft_config=peft.LoraConfig(task_type="CAUSAL_LM", r=4),
    )
    counts = train_profiled(trainer)
    assert len([e for e in trainer.state.log_history if "loss" in e]) == 2
    assert all(m.lora_B["default"].weight.abs().sum() > 0 for m in lora_linear_layers(trainer.model))
    assert_fused_every_step(trainer.model, counts, steps=2)
    assert_loads_in_plain_peft(trainer.model, tmp_path)
