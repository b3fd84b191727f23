"""Which optional packages are importable (PEFT's ``peft.import_utils`` names).

Every check looks the package up without importing it (``importlib.util.find_spec``), except where the answer
needs the package itself (bitsandbytes' 4-bit layer, transformer_engine's PyTorch part); none raises when a
package is missing or broken. The ``is_transformers_*`` flags read the installed version's metadata.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from functools import lru_cache

import packaging.version
import torch


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _version(distribution: str):
    try:
        return packaging.version.parse(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return None


def _transformers_at_least(minimum: str) -> bool:
    version = _version("transformers")
    return version is not None and version >= packaging.version.parse(minimum)


is_transformers_ge_v5 = _transformers_at_least("5.0.0.dev0")
is_transformers_ge_v5_1_0 = _transformers_at_least("5.1.0")
is_transformers_ge_v5_4_0 = _transformers_at_least("5.4.0")
is_transformers_ge_v5_6_0 = _transformers_at_least("5.6.0.dev0")
is_transformers_ge_v5_13_0 = _transformers_at_least("5.13.0.dev0")
is_transformers_ge_v5_17_0 = _transformers_at_least("5.17.0")
is_transformers_le_4_53 = _version("transformers") is not None and not _transformers_at_least("4.54.0.dev0")


@lru_cache
def is_bnb_available() -> bool:
    return _installed("bitsandbytes")


@lru_cache
def is_bnb_4bit_available() -> bool:
    if not is_bnb_available():
        return False
    try:
        import bitsandbytes as bnb
    except Exception:  # installed but unusable (no compatible native library): no 4-bit layers then
        return False
    return hasattr(bnb.nn, "Linear4bit")


@lru_cache
def is_gptqmodel_available() -> bool:
    return _installed("gptqmodel")


@lru_cache
def is_optimum_available() -> bool:
    return _installed("optimum")


@lru_cache
def is_torch_tpu_available(check_device: bool = True) -> bool:
    if not _installed("torch_xla"):
        return False
    if not check_device:
        return True
    try:
        import torch_xla.core.xla_model as xm

        xm.xla_device()
        return True
    except RuntimeError:
        return False


@lru_cache
def is_aqlm_available() -> bool:
    return _installed("aqlm")


@lru_cache
def is_eetq_available() -> bool:
    return _installed("eetq")


@lru_cache
def is_hqq_available() -> bool:
    return _installed("hqq")


@lru_cache
def is_inc_available() -> bool:
    return _installed("neural_compressor")


@lru_cache
def is_torchao_available() -> bool:
    return _installed("torchao") and _version("torchao") is not None


@lru_cache
def is_torchao_ge_v0_18_0() -> bool:
    return is_torchao_available() and _version("torchao") >= packaging.version.parse("0.18.0")


@lru_cache
def is_xpu_available(check_device: bool = False) -> bool:
    if platform.system() == "Darwin" or not hasattr(torch, "xpu"):
        return False
    try:
        return torch.xpu.is_available() if not check_device else torch.xpu.device_count() > 0
    except RuntimeError:
        return False


@lru_cache
def is_diffusers_available() -> bool:
    return _installed("diffusers")


@lru_cache
def is_te_available() -> bool:
    return _installed("transformer_engine")


@lru_cache
def is_te_pytorch_available() -> bool:
    return is_te_available() and _installed("transformer_engine.pytorch")
