"""Worker for test_distributed.py: ``torchrun --nproc_per_node 2 _dist_worker.py OUT_DIR`` (gloo, CPU).

Trains the same tiny LoRA Llama for STEPS SGD steps four ways, each from the same initial weights and on the
same global batches (rank r takes rows r::2 of each batch): one process on the whole batch (the reference,
computed on every rank, no communication), DDP, FSDP1 with ``fsdp_auto_wrap_policy``, FSDP2 ``fully_shard``.
Rank 0 writes ``results.json`` (per-step losses, what was reduced, which grads exist) and the adapters the
distributed runs saved, and reloads each adapter into a fresh model to compare logits.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _models import make_model  # noqa: E402

import peft_kernels as pk  # noqa: E402
from peft_kernels import ops  # noqa: E402

FUSED_CALLS = [0]
_fused = ops.lora_linear_multi


def _counting_lora_linear_multi(*args, **kwargs):
    # The LoRA layers call ops.lora_linear_multi by attribute: counting here shows the fused path ran.
    FUSED_CALLS[0] += 1
    return _fused(*args, **kwargs)


ops.lora_linear_multi = _counting_lora_linear_multi

STEPS = 3
GLOBAL_BATCH, SEQ = 4, 8
LR = 0.5


def build():
    """The tiny Llama (no dropout anywhere: the runs must see identical math) with a trainable LoRA adapter."""
    model, task = make_model("llama")
    config = pk.LoraConfig(task_type=task, r=4, lora_alpha=8, init_lora_weights=False)
    return pk.get_peft_model(model, config).train()


def batches():
    gen = torch.Generator().manual_seed(123)
    # [STEPS, GLOBAL_BATCH, SEQ] token ids, no padding: every row has the same number of loss tokens, so the
    # mean of the per-rank mean losses equals the single-process mean and DDP's averaged gradients equal its.
    return torch.randint(3, 100, (STEPS, GLOBAL_BATCH, SEQ), generator=gen)


def train(model, rows, step_hook=None):
    """SGD over the given rows of every batch; returns the per-step loss averaged over ranks (if any)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    FUSED_CALLS[0] = 0
    for step, batch in enumerate(batches()):
        ids = batch[rows]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step_hook is not None:
            step_hook(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        if dist.is_initialized() and rows != slice(None):
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
    return losses, FUSED_CALLS[0]


def trainable_names(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def reload_max_diff(trained, adapter_dir):
    """max |logits(trained) - logits(fresh base + adapter loaded from adapter_dir)| on a fixed input."""
    ids = batches()[0]
    fresh, _ = make_model("llama")
    loaded = pk.PeftModel.from_pretrained(fresh, adapter_dir)
    with torch.no_grad():
        a = trained(input_ids=ids).logits
        b = loaded(input_ids=ids).logits
    return (a - b).abs().max().item()


def run_ddp(rank, out_dir, results):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    pm = build()
    ddp = DDP(pm)
    reduced = {"numel": 0, "steps": 0}

    def count_and_allreduce(state, bucket):
        # Every element DDP communicates passes through the comm hook: frozen parameters never appear here.
        state["numel"] += bucket.buffer().numel()
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(reduced, count_and_allreduce)
    frozen_grads = []

    def after_backward(step):
        reduced["steps"] += 1
        frozen_grads.extend(n for n, p in pm.named_parameters() if not p.requires_grad and p.grad is not None)

    losses, fused_calls = train(ddp, slice(rank, None, 2), after_backward)
    adapter_dir = os.path.join(out_dir, "ddp_adapter")
    if rank == 0:
        pm.save_pretrained(adapter_dir)
    dist.barrier()
    results["ddp"] = {
        "losses": losses,
        "fused_calls": fused_calls,
        "reduced_numel_per_step": reduced["numel"] / max(reduced["steps"], 1),
        "trainable_numel": sum(p.numel() for p in pm.parameters() if p.requires_grad),
        "frozen_with_grad": frozen_grads,
        "reload_max_diff": reload_max_diff(pm.eval(), adapter_dir) if rank == 0 else None,
    }


def run_fsdp1(rank, out_dir, results):
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    pm = build()
    policy = pk.fsdp_auto_wrap_policy(pm)
    units = sorted({type(m).__name__ for m in pm.modules() if policy(m, False, 0)})
    # use_orig_params=True (accelerate's default): a LoRA-layer unit holds a frozen base weight and trainable A/B.
    fsdp = FSDP(pm, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    frozen_grads = []

    def after_backward(step):
        frozen_grads.extend(n for n, p in fsdp.named_parameters() if not p.requires_grad and p.grad is not None)

    losses, fused_calls = train(fsdp, slice(rank, None, 2), after_backward)
    with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        full = fsdp.state_dict()
    adapter_dir = os.path.join(out_dir, "fsdp1_adapter")
    reload = None
    if rank == 0:
        # As Trainer does: rank 0 alone saves from the gathered state dict (keys without FSDP's segments).
        pm.save_pretrained(adapter_dir, state_dict=full)
        plain = build()
        plain.load_state_dict(full)
        reload = reload_max_diff(plain.eval(), adapter_dir)
    dist.barrier()
    results["fsdp1"] = {
        "losses": losses,
        "fused_calls": fused_calls,
        "units": units,
        "frozen_with_grad": frozen_grads,
        "reload_max_diff": reload,
    }


def run_fsdp2(rank, out_dir, results):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    pm = build()
    policy = pk.fsdp_auto_wrap_policy(pm)
    # fully_shard bottom-up: children before the modules that contain them, the root last.
    for module in reversed(list(pm.modules())):
        if module is not pm and policy(module, False, 0):
            fully_shard(module)
    fully_shard(pm)
    frozen_grads = []

    def after_backward(step):
        frozen_grads.extend(n for n, p in pm.named_parameters() if not p.requires_grad and p.grad is not None)

    losses, fused_calls = train(pm, slice(rank, None, 2), after_backward)
    full = get_model_state_dict(pm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    adapter_dir = os.path.join(out_dir, "fsdp2_adapter")
    # FSDP2 keeps module names: save_pretrained reads the adapter tensors from the gathered full state dict.
    pm.save_pretrained(adapter_dir, state_dict=full, is_main_process=rank == 0)
    dist.barrier()
    reload = None
    if rank == 0:
        plain = build()
        plain.load_state_dict(full)
        reload = reload_max_diff(plain.eval(), adapter_dir)
    results["fsdp2"] = {
        "losses": losses,
        "fused_calls": fused_calls,
        "frozen_with_grad": frozen_grads,
        "reload_max_diff": reload,
    }


def main():
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    results = {"world_size": dist.get_world_size()}
    reference = build()
    results["trainable"] = trainable_names(reference)
    results["reference_losses"], results["reference_fused_calls"] = train(reference, slice(None))
    for fn in (run_ddp, run_fsdp1, run_fsdp2):
        fn(rank, out_dir, results)
    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
