"""Issue #8 part 4: gradient checkpointing, bf16 autocast and torch.compile of whole PeftModels (CPU)."""

import os
import warnings

import pytest
import torch
from _models import make_inputs, make_model
from _tolerances import BF16_AUTOCAST_REL, EXACT, FP32_SAME_MATH, assert_close, assert_close_rel_to_max

import peft_kernels as pk
from peft_kernels import ops


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = ops.lora_linear_multi

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "lora_linear_multi", counting)
    return calls


def lora_model(family, lora_dropout=0.1):
    model, task = make_model(family)
    # transformers' loss_function logs a warning when loss_type is unset, which dynamo cannot trace.
    model.loss_type = "ForCausalLM"
    config = pk.LoraConfig(task_type=task, r=4, lora_alpha=8, lora_dropout=lora_dropout, init_lora_weights=False)
    return pk.get_peft_model(model, config).train()


def loss_and_grads(model, inputs, seed=0):
    """(loss, {trainable name: grad}) of one training forward/backward from RNG seed ``seed``."""
    torch.manual_seed(seed)  # LoRA dropout seeds and GPT-2's own dropouts come from this generator
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grads = {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize(
    "family, reentrant",
    # Conv1D and nn.Linear bases; the docs example runs Llama non-reentrant as well.
    [("gpt2", True), ("gpt2", False), ("llama", True)],
    ids=["gpt2-reentrant", "gpt2-non-reentrant", "llama-reentrant"],
)
def test_gradient_checkpointing_replays_the_dropout_mask(family, reentrant, fused_calls):
    inputs = make_inputs(family)
    eager = lora_model(family)
    want_loss, want_grads = loss_and_grads(eager, inputs)
    other_loss, _ = loss_and_grads(eager, inputs, seed=1)
    assert other_loss != want_loss, "LoRA dropout is active (another seed, another loss)"

    model = lora_model(family)
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        # Reentrant checkpointing only backpropagates into blocks whose input requires grad; the embeddings
        # are frozen, so the hidden states need requires_grad for the LoRA weights inside to get gradients.
        base.enable_input_require_grads()
    fused_calls.clear()
    loss, grads = loss_and_grads(model, inputs)
    n_layers = sum(1 for m in model.modules() if isinstance(m, pk.tuners.lora.LoraLayer))
    assert len(fused_calls) == 2 * n_layers, "every LoRA layer ran fused, once more in the recompute"
    # Recomputation restores the RNG state, draws the same dropout seed, so everything is bit-identical.
    assert_close(loss, want_loss, EXACT, "loss")
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert_close(grads[name], grad, EXACT, name)


@pytest.mark.oracle
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bf16_autocast_matches_peft(family, fused_calls):
    peft = pytest.importorskip("peft")
    inputs = make_inputs(family)
    # No LoRA dropout: PEFT's masks come from nn.Dropout, ours from a Philox seed (docs/PEFT_CONTRACT.md §13).
    model = lora_model(family, lora_dropout=0.0)
    reference_base, task = make_model(family)
    reference = peft.get_peft_model(
        reference_base, peft.LoraConfig(task_type=task, r=4, lora_alpha=8, lora_dropout=0.0)
    )
    reference.load_state_dict(model.state_dict())
    reference.train()
    results = []
    for m in (model, reference):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), grads))
    (logits, grads), (want_logits, want_grads) = results
    assert fused_calls, "the fused op ran under autocast"
    assert logits.dtype == want_logits.dtype == torch.bfloat16
    assert_close_rel_to_max(logits.float(), want_logits.float(), BF16_AUTOCAST_REL, "logits")
    for name, grad in want_grads.items():
        assert grads[name].dtype == torch.float32, "the adapter (fp32 params) gets fp32 gradients"
        assert_close_rel_to_max(grads[name], grad, BF16_AUTOCAST_REL, name)


def test_compile_lora_fullgraph():
    """Dynamo captures the whole PeftModel forward+backward in one graph; AOT autograd runs it (aot_eager)."""
    inputs = make_inputs("gpt2")
    model = lora_model("gpt2")
    want_loss, want_grads = loss_and_grads(model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for _ in range(2):  # the second call reuses the graph
        loss, grads = loss_and_grads(compiled, inputs)
        assert_close(loss, want_loss, FP32_SAME_MATH, "compiled loss")
        for name, grad in want_grads.items():
            assert_close(grads[name], grad, FP32_SAME_MATH, name)


def test_compile_prefix_tuning_fullgraph():
    inputs = make_inputs("llama")
    base, task = make_model("llama")
    base.loss_type = "ForCausalLM"
    model = pk.get_peft_model(base, pk.PrefixTuningConfig(task_type=task, num_virtual_tokens=3)).train()
    want_loss, want_grads = loss_and_grads(model, inputs)
    torch._dynamo.reset()
    loss, grads = loss_and_grads(torch.compile(model, backend="aot_eager", fullgraph=True), inputs)
    assert_close(loss, want_loss, FP32_SAME_MATH, "compiled prefix loss")
    for name, grad in want_grads.items():
        assert_close(grads[name], grad, FP32_SAME_MATH, name)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("PEFT_KERNELS_TEST_INDUCTOR") != "1",
    reason="inductor codegen of a whole model takes 45-80 s on 2 CPU cores; set PEFT_KERNELS_TEST_INDUCTOR=1",
)
def test_compile_lora_inductor(monkeypatch):
    # Inductor generates its own random numbers unless told to use eager's: needed for GPT-2's dropouts and
    # the LoRA dropout seed to match the eager run.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    inputs = make_inputs("gpt2")
    model = lora_model("gpt2")
    want_loss, want_grads = loss_and_grads(model, inputs)
    torch._dynamo.reset()
    loss, grads = loss_and_grads(torch.compile(model, fullgraph=True), inputs)
    assert_close(loss, want_loss, FP32_SAME_MATH, "inductor loss")
    for name, grad in want_grads.items():
        assert_close(grads[name], grad, FP32_SAME_MATH, name)
