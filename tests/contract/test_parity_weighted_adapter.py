"""Issue #18 item 2: ``add_weighted_adapter`` against real peft 0.21.2 — every combination type, negative weights,
rank patterns, svd options, over Linear, Embedding, Conv2d and GPT-2 Conv1D (fan_in_fan_out) layers.

Both libraries start from the same adapters (ours loads peft's state dict) and the same global seed (the
``dare`` types draw Bernoulli masks from it), so the combined adapter's weights must agree.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _tolerances import FP32_SAME_MATH, assert_close
from torch import nn

import peft_kernels as pk
from peft_kernels.utils import merge_utils

pytestmark = pytest.mark.usefixtures("one_thread_quiet")

ALL_TYPES = [
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 7)
        self.c1d = Conv1D(5, 7)  # GPT-2 layout: weight (in=7, out=5)
        self.conv = nn.Conv2d(5, 4, 3, padding=1)
        self.pw = nn.Conv2d(4, 6, 1)  # min(C_out, C_in) ≥ the svd rank (PEFT cannot reshape less)

    def forward(self, ids):
        h = self.c1d(torch.tanh(self.lin(self.emb(ids))))  # (N, L, 5)
        img = h.transpose(1, 2).unsqueeze(-1)  # (N, 5, L, 1)
        return self.pw(torch.tanh(self.conv(img)))


TARGETS = ["emb", "lin", "c1d", "conv", "pw"]


def _pair(rank_a=4, rank_b=4, pattern_a=None, pattern_b=None):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Mixed().eval()
    kw = dict(target_modules=TARGETS, init_lora_weights=False)
    cfg_a = dict(kw, r=rank_a, lora_alpha=8, rank_pattern=pattern_a or {})
    cfg_b = dict(kw, r=rank_b, lora_alpha=3, rank_pattern=pattern_b or {})
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg_a), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(**cfg_b))
    ours = pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(**cfg_a), adapter_name="a")
    ours.add_adapter("b", pk.LoraConfig(**cfg_b))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _new_adapter_weights(model, name="mix"):
    return {k: v for k, v in model.state_dict().items() if f".{name}." in k or k.endswith(f".{name}")}


def _combine_both(theirs, ours, **kwargs):
    torch.manual_seed(7)
    theirs.add_weighted_adapter(**kwargs)
    torch.manual_seed(7)
    ours.add_weighted_adapter(**kwargs)
    w_theirs, w_ours = _new_adapter_weights(theirs), _new_adapter_weights(ours)
    assert w_ours.keys() == w_theirs.keys() and len(w_theirs) == 2 * len(TARGETS)
    for key, value in w_theirs.items():
        assert w_ours[key].shape == value.shape, key
        assert_close(w_ours[key], value, FP32_SAME_MATH, f"{kwargs['combination_type']} {key}")
    c_theirs, c_ours = theirs.peft_config["mix"], ours.peft_config["mix"]
    assert (c_ours.r, c_ours.lora_alpha, c_ours.target_modules) == (
        c_theirs.r,
        c_theirs.lora_alpha,
        c_theirs.target_modules,
    )
    assert not any(p.requires_grad for k, p in ours.named_parameters() if ".mix." in k)


@pytest.mark.oracle
@pytest.mark.parametrize("combination_type", ALL_TYPES)
def test_every_combination_type_with_negative_weight_matches_peft(combination_type):
    theirs, ours = _pair()
    density = 0.6 if combination_type not in ("svd", "linear", "cat") else None
    _combine_both(
        theirs, ours, adapters=["a", "b"], weights=[0.7, -0.4], adapter_name="mix",
        combination_type=combination_type, density=density,
    )  # fmt: skip
    ids = torch.tensor([[1, 4, 9, 2], [0, 3, 3, 10]])
    with torch.no_grad():
        theirs.set_adapter("mix")
        ours.set_adapter("mix")
        assert_close(ours(ids), theirs(ids), FP32_SAME_MATH, f"{combination_type} forward")


@pytest.mark.oracle
@pytest.mark.parametrize("combination_type", ["cat", "svd", "ties_svd", "linear", "magnitude_prune"])
def test_rank_patterns_match_peft(combination_type):
    if combination_type in ("linear", "magnitude_prune"):  # these need equal ranks: same pattern on both
        theirs, ours = _pair(pattern_a={"lin": 2}, pattern_b={"lin": 2})
    else:
        theirs, ours = _pair(rank_a=4, rank_b=2, pattern_a={"lin": 2}, pattern_b={"conv": 3})
    _combine_both(
        theirs, ours, adapters=["a", "b"], weights=[1.0, 0.5], adapter_name="mix",
        combination_type=combination_type, density=0.5,
    )  # fmt: skip


@pytest.mark.oracle
@pytest.mark.parametrize(
    "options",
    [
        dict(svd_rank=2, svd_clamp=0.9),
        dict(svd_full_matrices=False, majority_sign_method="frequency", combination_type="ties_svd", density=0.5),
        dict(svd_driver=None, svd_rank=3),
    ],
)
def test_svd_options_match_peft_and_are_deterministic(options):
    theirs, ours = _pair()
    kwargs = dict(adapters=["a", "b"], weights=[0.3, 0.9], adapter_name="mix", combination_type="svd") | options
    _combine_both(theirs, ours, **kwargs)
    first = _new_adapter_weights(ours)
    ours.delete_adapter("mix")
    torch.manual_seed(123)  # a different global seed: the svd types draw nothing from it
    ours.add_weighted_adapter(**kwargs)
    for key, value in _new_adapter_weights(ours).items():
        assert torch.equal(value, first[key]), f"deterministic {key}"


@pytest.mark.oracle
def test_single_adapter_and_errors_match_peft():
    theirs, ours = _pair(rank_a=4, rank_b=2)
    # One adapter: every type is "linear" (so any rank works); an existing name is a silent no-op.
    _combine_both(theirs, ours, adapters=["b"], weights=[2.0], adapter_name="mix", combination_type="ties")
    before = _new_adapter_weights(ours)
    ours.add_weighted_adapter(["a"], [1.0], "mix")
    assert all(torch.equal(v, before[k]) for k, v in _new_adapter_weights(ours).items())
    cases = [
        (dict(adapters=["a", "zz"], weights=[1, 1]), "Adapter zz does not exist"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="linear"), "same r value"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="nope"), "Invalid combination_type: nope"),
    ]
    for kwargs, match in cases:
        for model in (theirs, ours):
            with pytest.raises(ValueError, match=match):
                model.add_weighted_adapter(adapter_name="bad", **kwargs)
        assert "bad" not in ours.peft_config


def test_merge_utils_formulas_on_a_hand_example():
    t1 = torch.tensor([3.0, -1.0, 0.5, -4.0])
    t2 = torch.tensor([-2.0, 2.0, 0.25, -1.0])
    w = torch.tensor([1.0, 0.5])
    assert torch.equal(merge_utils.task_arithmetic([t1, t2], w), t1 + 0.5 * t2)
    # density 0.5 keeps the two largest |t| of each: t1 → [3, 0, 0, -4], t2 → [-2, 2, 0, 0]
    assert torch.equal(merge_utils.magnitude_prune([t1, t2], w, 0.5), torch.tensor([2.0, 1.0, 0.0, -4.0]))
    # ties: majority sign of the pruned sum [1, 2, 0, -4] → [+, +, +, -]; mean of the agreeing weighted values
    assert torch.equal(merge_utils.ties([t1, t2], w, 0.5), torch.tensor([3.0, 1.0, 0.0, -4.0]))
    # dare_linear: each entry is Σ_i m_i w_i t_i / density with m_i ∈ {0, 1}
    torch.manual_seed(0)
    dare = merge_utils.dare_linear([t1, t2], w, 0.5)
    for j in range(4):
        options = [(m1 * t1[j] + m2 * 0.5 * t2[j]) / 0.5 for m1 in (0, 1) for m2 in (0, 1)]
        assert any(torch.equal(dare[j], o) for o in options), j
    with pytest.raises(ValueError, match="Density should be >= 0"):
        merge_utils.prune(t1, -0.1, "magnitude")
