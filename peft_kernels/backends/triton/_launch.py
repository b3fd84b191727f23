"""Launch plumbing shared by the Triton launchers (``lora.py``, ``prefix.py``): what the device is (compute
capability, SM count), the precision of fp32 dots, the tile configuration of a launch (autotuned GEMM kernels, one
heuristic config for the memory-bound ones, both from ``_configs.py``), split counts and reduction buffers for sums
across programs, and the device guard. No kernel and no capability check lives here.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

from . import _configs, interpreting

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Pinned FMA contraction (Triton 3.10 flips the default of TRITON_DEFAULT_FP_FUSION to off; docs/KERNELS.md §10.9).
FP_FUSION = True


def fp32_precision() -> str:
    """input_precision of fp32 × fp32 dots: torch's fp32 matmul setting, read at call time (no caching)."""
    if interpreting() or torch.version.hip is not None:
        return "ieee"
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if setting in ("tf32", "ieee"):
        return "tf32" if setting == "tf32" else "tf32x3"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


@functools.cache
def capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.cache
def _num_sms_cuda(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    if device.type != "cuda" or interpreting():
        return _configs.INTERPRET_NUM_SMS
    return _num_sms_cuda(device_index(device))


# (op, arch, element bytes, M bucket) -> the autotuned kernel: one autotuner, so one tuning run, per key.
_AUTOTUNED: dict[tuple[str, object, int, str], triton.runtime.Autotuner] = {}


def gemm_launcher(op: str, kernel, key: list[str], device: torch.device, elem_bytes: int, m: int):
    """``kernel`` (the GEMM-shaped kernel of ``op``) autotuned on ``key`` over ``_configs``' list for this
    device/dtype/M bucket; under the interpreter a one-config autotuner (no benchmarking) built per call, so tests
    can swap ``_configs.INTERPRET_CONFIGS``."""
    if interpreting() or device.type != "cuda":
        return triton.autotune(configs=[_configs.INTERPRET_CONFIGS[op]], key=key)(kernel)
    arch = "hip" if torch.version.hip is not None else capability(device_index(device))
    cache_key = (op, arch, elem_bytes, _configs.m_bucket(m))
    if cache_key not in _AUTOTUNED:
        if arch == "hip":
            configs = _configs.hip_configs(op, elem_bytes, cache_key[3])
        else:
            configs = _configs.cuda_configs(op, arch, elem_bytes, cache_key[3])
        prune = {"early_config_prune": _configs.prune_configs}  # B2 with dropout: spill-free tiles only
        _AUTOTUNED[cache_key] = triton.autotune(configs=configs, key=key, prune_configs_by=prune)(kernel)
    return _AUTOTUNED[cache_key]


def memory_bound_config(op: str, rank_block: int, device: torch.device) -> triton.Config:
    if interpreting() or device.type != "cuda":
        return _configs.INTERPRET_CONFIGS[op]
    return _configs.heuristic_config(op, rank_block)


def splits(own_blocks: int, split_tiles: int, num_sms: int) -> tuple[int, int]:
    """(splits, tiles per split) along a reduction axis of ``split_tiles`` tiles, given ``own_blocks`` independent
    programs: split only until about 4 CTAs per SM are in flight (memory-bound kernels need the occupancy)."""
    target = 4 * num_sms
    splits = 1 if own_blocks >= target else max(1, min(split_tiles, triton.cdiv(target, own_blocks)))
    per = triton.cdiv(split_tiles, splits)
    return triton.cdiv(split_tiles, per), per


def reduction_buffer(splits: int, shape: tuple[int, ...], device) -> tuple[torch.Tensor, int, bool]:
    """(buffer, split stride, atomic) for an fp32 sum over ``splits`` programs.

    1 split: plain stores into the result. Deterministic mode: a (splits, *shape) workspace, summed by torch in a
    fixed order afterwards. Otherwise: zeroed result + fp32 atomics (order-dependent in the last bits).
    """
    if splits == 1:
        return torch.empty(shape, dtype=torch.float32, device=device), 0, False
    if torch.are_deterministic_algorithms_enabled():
        ws = torch.empty((splits, *shape), dtype=torch.float32, device=device)
        return ws, ws.stride(0), False
    return torch.zeros(shape, dtype=torch.float32, device=device), 0, True


def finish_reduction(buf: torch.Tensor, ndim: int) -> torch.Tensor:
    """The sum of a ``reduction_buffer``: the workspace summed over its splits, else the buffer itself."""
    return buf.sum(0) if buf.dim() > ndim else buf


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s CUDA device (Triton launches on the current device); nothing for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
