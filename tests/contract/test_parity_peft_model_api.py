"""Issue #18 items 3-4: ``PeftModel.push_to_hub`` (uploads the adapter; huggingface_hub mocked, no network) and
``PeftModel.has_active_enabled_adapter``, against real peft 0.21.2."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load
from torch import nn

import peft_kernels as pk

pytestmark = pytest.mark.usefixtures("one_thread_quiet")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi's repo/commit/branch calls recorded instead of sent: {path_in_repo: bytes} per commit."""
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    commits = []

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": f"user/{repo_id}" if "/" not in repo_id else repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = open(src, "rb").read() if isinstance(src, str) else src.read()
        commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return "commit-url"

    def no_remote_card(*args, **kwargs):
        raise EntryNotFoundError("no card on the (mocked) hub")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "create_branch", lambda self, **kwargs: None)
    monkeypatch.setattr(ModelCard, "load", classmethod(lambda cls, repo_id, **kw: no_remote_card()))
    return commits


@pytest.mark.oracle
def test_push_to_hub_uploads_the_adapter_like_peft(fake_hub):
    peft = pytest.importorskip("peft")
    config = dict(target_modules=["0"], r=2, init_lora_weights=False)
    base = _mlp()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(**config))  # a plain nn.Module base
    ours.load_state_dict(theirs.state_dict())
    theirs.push_to_hub("adapter")
    ours.push_to_hub("adapter", commit_message="mine", tags=["demo"])
    pushed_t, pushed_o = fake_hub
    assert (
        set(pushed_o["files"])
        == set(pushed_t["files"])
        == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    )
    assert pushed_o["repo_id"] == "user/adapter" and pushed_o["commit_message"] == "mine"
    weights_t, weights_o = (
        load(pushed_t["files"]["adapter_model.safetensors"]),
        load(pushed_o["files"]["adapter_model.safetensors"]),
    )
    assert set(weights_o) == set(weights_t) == {"base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight"}
    assert all(torch.equal(weights_o[k], weights_t[k]) for k in weights_t)
    config_o = json.loads(pushed_o["files"]["adapter_config.json"])
    assert config_o["peft_type"] == "LORA" and config_o["r"] == 2
    assert b"demo" in pushed_o["files"]["README.md"]


def test_push_to_hub_with_two_adapters_and_a_branch(fake_hub):
    model = pk.get_peft_model(_mlp(), pk.LoraConfig(target_modules=["0"]))
    model.add_adapter("other", pk.LoraConfig(target_modules=["2"]))
    model.push_to_hub("org/adapter", revision="dev", create_pr=True)
    (commit,) = fake_hub
    assert commit["repo_id"] == "org/adapter" and commit["revision"] == "dev" and commit["create_pr"] is True
    assert {"adapter_model.safetensors", "other/adapter_model.safetensors", "other/adapter_config.json"} <= set(
        commit["files"]
    )


@pytest.mark.oracle
def test_has_active_enabled_adapter_matches_peft():
    peft = pytest.importorskip("peft")
    for lib in (peft, pk):
        model = lib.get_peft_model(_mlp(), lib.LoraConfig(target_modules=["0"]))
        states = [model.has_active_enabled_adapter]
        with model.disable_adapter():
            states.append(model.has_active_enabled_adapter)
        states.append(model.has_active_enabled_adapter)
        prompt = lib.get_peft_model(
            _tiny_causal_lm(), lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
        )
        states.append(prompt.has_active_enabled_adapter)
        with prompt.disable_adapter():
            states.append(prompt.has_active_enabled_adapter)
        if lib is peft:
            expected = states
        else:
            assert states == expected == [True, False, True, True, False]


def _tiny_causal_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=16))
