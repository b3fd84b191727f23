"""Issue #8 part 3: DDP, FSDP1 (fsdp_auto_wrap_policy) and FSDP2 on CPU with 2 processes (gloo)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from _models import make_inputs, make_model
from _tolerances import DISTRIBUTED_LOSS, EXACT, FP32_SAME_MATH, assert_close

import peft_kernels as pk

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One torchrun launch runs every mode (each process pays the torch/transformers import once)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        os.path.join(HERE, "_dist_worker.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(out / "results.json") as f:
        return json.load(f)


N_LORA_LAYERS = 4  # tiny Llama: q_proj and v_proj in 2 layers


@pytest.mark.parametrize("mode", ["ddp", "fsdp1", "fsdp2"])
def test_losses_match_single_process(results, mode):
    assert results["world_size"] == 2
    got = torch.tensor(results[mode]["losses"])
    want = torch.tensor(results["reference_losses"])
    assert_close(got, want, DISTRIBUTED_LOSS, f"{mode} per-step loss")
    # Every LoRA forward went through the fused op (no silent eager fallback under the wrappers).
    steps = len(want)
    assert results[mode]["fused_calls"] == N_LORA_LAYERS * steps
    assert results["reference_fused_calls"] == N_LORA_LAYERS * steps


@pytest.mark.parametrize("mode", ["ddp", "fsdp1", "fsdp2"])
def test_frozen_base_gets_no_gradient_and_adapter_reloads(results, mode):
    assert results[mode]["frozen_with_grad"] == []
    # The adapter rank 0 saved, loaded into a fresh base model, reproduces the trained model's logits.
    assert results[mode]["reload_max_diff"] == 0.0


def test_ddp_reduces_only_the_adapter(results):
    ddp = results["ddp"]
    assert all(".lora_" in name for name in results["trainable"])
    assert ddp["reduced_numel_per_step"] == ddp["trainable_numel"] == 896


def test_fsdp_policy_units():
    model, task = make_model("llama")
    pm = pk.get_peft_model(model, pk.LoraConfig(task_type=task, r=4))
    policy = pk.fsdp_auto_wrap_policy(pm)
    units = {name for name, module in pm.named_modules() if policy(module, False, 0)}
    blocks = {f"base_model.model.model.layers.{i}" for i in range(2)}
    lora = {f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert units == blocks | lora
    assert policy(pm, True, 0), "the policy always recurses"


def test_fused_path_steps_aside_for_wrapped_adapter_weights():
    """A/B whose weights are materialized by their own forward (FSDP units, offload hooks) run eagerly."""
    model, task = make_model("llama")
    pm = pk.get_peft_model(model, pk.LoraConfig(task_type=task, r=4, init_lora_weights=False))
    inputs = make_inputs("llama")
    want = pm(**inputs).logits
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    real = layer.lora_A["default"].weight.detach().clone()
    with torch.no_grad():
        layer.lora_A["default"].weight.zero_()  # stale until the pre-forward hook restores it

    def materialize(module, args):
        with torch.no_grad():
            module.weight.copy_(real)

    layer.lora_A["default"].register_forward_pre_hook(materialize)
    assert_close(pm(**inputs).logits, want, FP32_SAME_MATH, "hooked lora_A")
    assert_close(layer.lora_A["default"].weight.detach(), real, EXACT, "the hook ran")
