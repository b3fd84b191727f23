"""Issue #18 item 3: ``peft_kernels.optimizers`` against ``peft.optimizers`` — LoRA+ parameter groups and learning
rates, and LoRA-FA / Riemannian training steps, on identical tiny models (ours loads peft's adapter weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from _tolerances import FP32_SAME_MATH, assert_close
from torch import nn

import peft_kernels as pk
from peft_kernels.optimizers import create_lorafa_optimizer, create_loraplus_optimizer, create_riemannian_optimizer

pytestmark = [pytest.mark.usefixtures("one_thread_quiet"), pytest.mark.oracle]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.lin0 = nn.Linear(6, 8)
        self.lin1 = nn.Linear(8, 3)

    def forward(self, ids):
        return self.lin1(torch.relu(self.lin0(self.norm(self.emb(ids)))))


CONFIG = dict(target_modules=["emb", "lin0", "lin1"], r=4, lora_alpha=8, init_lora_weights=False)


def _pair(**extra):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Net()
    config = CONFIG | extra
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(**config))
    ours.load_state_dict(theirs.state_dict())
    for model in (theirs, ours):  # norm trains too: a 1-d weight and a bias in the LoRA+ "B" groups
        model.base_model.model.norm.requires_grad_(True)
    return theirs, ours


def _groups_by_name(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        ({k: v for k, v in g.items() if k != "params"}, sorted(names[id(p)] for p in g["params"]))
        for g in optimizer.param_groups
    ]


def _train(model, optimizer, steps=3):
    ids = torch.tensor([[1, 4, 9], [0, 3, 7]])
    for _ in range(steps):
        optimizer.zero_grad()
        model(ids).pow(2).mean().backward()
        optimizer.step()


def _assert_same_params(ours, theirs, name):
    sd_t = theirs.state_dict()
    for key, value in ours.state_dict().items():
        assert_close(value, sd_t[key], FP32_SAME_MATH, f"{name} {key}")


@pytest.mark.parametrize("extra", [{}, dict(loraplus_lr_embedding=1e-3, loraplus_weight_decay=0.1, weight_decay=0.2)])
def test_loraplus_groups_and_lrs_match_peft(extra):
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    theirs, ours = _pair()
    opt_t = peft_loraplus(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, **extra)
    opt_o = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, **extra)
    groups_o = _groups_by_name(ours, opt_o)
    assert groups_o == _groups_by_name(theirs, opt_t)
    assert [g["lr"] for g in opt_o.param_groups] == [1e-3, extra.get("loraplus_lr_embedding", 1e-6), 1.6e-2, 1.6e-2]
    assert any("norm.bias" in n for n in groups_o[3][1]) and any("lora_B" in n for n in groups_o[2][1])
    _train(theirs, opt_t)
    _train(ours, opt_o)
    _assert_same_params(ours, theirs, "loraplus")


def test_lorafa_freezes_a_and_trains_like_peft():
    from peft.optimizers import create_lorafa_optimizer as peft_lorafa

    theirs, ours = _pair()
    opt_t = peft_lorafa(theirs, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.01)
    opt_o = create_lorafa_optimizer(ours, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.01)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n for n, p in theirs.named_parameters() if p.requires_grad
    ]
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_A" in n)
    assert opt_o.param_groups[0]["scaling_factors"] == opt_t.param_groups[0]["scaling_factors"]
    before = {n: p.clone() for n, p in ours.named_parameters()}
    _train(theirs, opt_t)
    _train(ours, opt_o)
    _assert_same_params(ours, theirs, "lorafa")
    # The optimizer state has PEFT's keys and fields (exp_avg_B / exp_avg_sq_B for a LoRA pair), so a checkpointed
    # optimizer resumes in either library.
    assert sorted(opt_o.state) == sorted(opt_t.state)
    for key, state in opt_o.state.items():
        assert sorted(state) == sorted(opt_t.state[key]), key
        for field, value in state.items():
            if torch.is_tensor(value):
                assert_close(value, opt_t.state[key][field], FP32_SAME_MATH, f"lorafa state {key} {field}")
    assert not torch.equal(
        before["base_model.model.lin0.lora_B.default.weight"], ours.base_model.model.lin0.lora_B["default"].weight
    )
    with pytest.raises(ValueError, match="use_rslora=True"):
        create_lorafa_optimizer(ours, r=4, lora_alpha=8, lr=1e-2, use_rslora=True)


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_riemannian_steps_match_peft(optimizer_cls):
    from peft.optimizers import create_riemannian_optimizer as peft_riemannian

    theirs, ours = _pair()
    opt_t = peft_riemannian(theirs, optimizer_cls, lr=1e-2, reg=1e-2)
    opt_o = create_riemannian_optimizer(ours, optimizer_cls, lr=1e-2, reg=1e-2)
    assert isinstance(opt_o, optimizer_cls)
    _train(theirs, opt_t)
    _train(ours, opt_o)
    _assert_same_params(ours, theirs, "riemannian")
    with pytest.raises(ValueError, match="does not support closures"):
        opt_o.step(lambda: 0.0)
    with pytest.raises(ValueError, match="requires a closure"):
        create_riemannian_optimizer(ours, torch.optim.LBFGS, lr=1.0)
    with pytest.raises(ValueError, match="did not find any trainable lora_A/lora_B"):
        create_riemannian_optimizer(Net(), torch.optim.SGD, lr=1.0)
