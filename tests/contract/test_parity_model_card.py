"""Issue #18 item 7: the README.md model card ``save_pretrained`` writes equals PEFT 0.21.2's — metadata, the
default template, merging into an existing card — except the framework-version line (our format version)."""

from __future__ import annotations

import warnings

import pytest
import torch

import peft_kernels as pk
from peft_kernels.version import PEFT_VERSION_STRING

pytestmark = [pytest.mark.usefixtures("one_thread_quiet"), pytest.mark.oracle]

EXISTING = "---\nlicense: mit\ntags:\n- mine\n---\n\n# My card\n\nHello.\n"


def _model(lib, task_type):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=16))
    base.config._name_or_path = "org/base-model"
    return lib.get_peft_model(base, lib.LoraConfig(target_modules=["c_attn"], task_type=task_type))


@pytest.mark.parametrize("existing", [None, EXISTING])
@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_model_card_matches_peft(tmp_path, existing, task_type):
    from huggingface_hub import ModelCard

    peft = pytest.importorskip("peft")
    cards = []
    for lib in (peft, pk):
        folder = tmp_path / lib.__name__
        folder.mkdir()
        if existing:
            (folder / "README.md").write_text(existing)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _model(lib, task_type).save_pretrained(folder)
        cards.append((folder / "README.md").read_text())
    theirs, ours = cards
    assert ModelCard(ours).data.to_dict() == ModelCard(theirs).data.to_dict()
    assert ours.replace(f"- PEFT {PEFT_VERSION_STRING}", f"- PEFT {peft.__version__}") == theirs
    # saving again does not duplicate the version line
    _model(pk, task_type).save_pretrained(tmp_path / "peft_kernels")
    assert (tmp_path / "peft_kernels" / "README.md").read_text().count(f"- PEFT {PEFT_VERSION_STRING}") == 1
