"""Plumbing shared by the CUDA C++ wrappers: dtype codes, device checks, raw pointers, the launch itself.

Every wrapper in this package follows the launcher duties of docs/ARCHITECTURE.md §4: (1) collect every reason the
call cannot run (device, dtype, shape, strides, alignment) and raise ``ValueError`` listing them before anything
is launched, (2) allocate outputs with torch, (3) call the ``_C`` launcher with ``data_ptr()``s, sizes, strides,
a dtype code and ``torch.cuda.current_stream().cuda_stream`` under ``torch.cuda.device``.
"""

from __future__ import annotations

import functools

import torch

# Mirror of csrc/common.h `DType` (tests/kernels/test_cuda_ext.py pins it against _C.dtype_codes()).
DTYPE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.int8: 3}
# csrc/common.h kAbiVersion: a built _C with another value has other launcher signatures and is refused.
ABI_VERSION = 1
# csrc/small_m.cuh: the decode kernels take M <= SMALL_M_MAX rows and K in chunks of CHUNK_K elements.
SMALL_M_MAX = 16
CHUNK_K = 16
HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def ptr(tensor: torch.Tensor | None) -> int:
    """The raw device address the launchers take; 0 stands for an absent optional tensor."""
    return 0 if tensor is None else tensor.data_ptr()


def aligned(tensor: torch.Tensor, nbytes: int = 16) -> bool:
    return tensor.data_ptr() % nbytes == 0


def launch(launcher, device: torch.device, *args) -> None:
    """launcher(*args, device_index, stream) on ``device``'s current stream (CUDA-graph capturable)."""
    with torch.cuda.device(device):
        launcher(*args, device.index, torch.cuda.current_stream(device).cuda_stream)


def _arch_runs(capability: tuple[int, int], cubin_archs: str, ptx_archs: str) -> bool:
    """A cubin sm_XY runs on X.Y' with Y' >= Y (same major); PTX compute_XY is JIT-compiled for any cc >= X.Y."""
    major, minor = capability
    for arch in filter(None, cubin_archs.split(";")):
        arch_major, arch_minor = divmod(int(arch.rstrip("a")), 10)
        if arch_major == major and (minor == arch_minor if arch.endswith("a") else minor >= arch_minor):
            return True
    return any(major * 10 + minor >= int(arch) for arch in filter(None, ptx_archs.split(";")))


@functools.cache
def device_reason(index: int) -> str | None:
    """Why device ``index`` cannot run this build's kernels (decided once per device), or None."""
    from . import extension

    info = extension().build_info()
    capability = torch.cuda.get_device_capability(index)
    if capability < (8, 0):
        return f"device {index} has compute capability {capability[0]}.{capability[1]}; the kernels need sm_80+"
    if not _arch_runs(capability, info["cuda_archs"], info["cuda_ptx"]):
        return (
            f"device {index} (sm_{capability[0]}{capability[1]}) is not covered by this build "
            f"(cubins {info['cuda_archs']!r}, PTX {info['cuda_ptx']!r}); rebuild with PEFT_KERNELS_CUDA_ARCHS"
        )
    return None


def device_reasons(anchor: torch.Tensor, **tensors: torch.Tensor | None) -> list[str]:
    """anchor on a usable CUDA device and every other (non-None) tensor on the same device."""
    if anchor.device.type != "cuda":
        return [f"tensors are on {anchor.device.type}, not CUDA"]
    reasons = [
        f"{name} is on {t.device}, not {anchor.device}"
        for name, t in tensors.items()
        if t is not None and t.device != anchor.device
    ]
    reason = device_reason(anchor.device.index if anchor.device.index is not None else torch.cuda.current_device())
    return reasons + ([reason] if reason else [])
