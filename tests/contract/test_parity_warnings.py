"""Issue #18 item 6: warnings PEFT 0.21.2 emits, emitted by peft_kernels with the same category and text."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peft_kernels as pk

pytestmark = [pytest.mark.usefixtures("one_thread_quiet"), pytest.mark.oracle]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize(
    "patterns",
    [dict(rank_pattern={"nope": 2}), dict(alpha_pattern={"0": 3, "typo": 5}), dict(rank_pattern={"0": 2})],
)
def test_unmatched_rank_and_alpha_pattern_keys_warn_like_peft(patterns):
    peft = pytest.importorskip("peft")
    found = []
    for lib in (peft, pk):
        config = lib.LoraConfig(target_modules=["0"], **patterns)
        caught = _caught(lambda lib=lib, config=config: lib.get_peft_model(_mlp(), config))
        found.append([c for c in caught if "did not match any targeted module" in c[1]])
    assert found[1] == found[0]
    assert bool(found[1]) == any(k in ("nope", "typo") for p in patterns.values() for k in p)
    if found[1]:
        assert found[1][0][0] is RuntimeWarning
