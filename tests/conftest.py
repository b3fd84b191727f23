import importlib.util
import os
import warnings

import pytest
import torch

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HAS_CUDA = torch.cuda.is_available()
HAS_PEFT = importlib.util.find_spec("peft") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    skip_oracle = pytest.mark.skip(reason="peft 0.21.2 (the test oracle) is not installed; pip install -e .[test]")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("oracle") is not None and not HAS_PEFT:
            item.add_marker(skip_oracle)


@pytest.fixture
def one_thread_quiet():
    """One torch thread and warnings silenced for the test (tiny tensors: threads only add synchronisation on a
    shared 2-core machine; the tiny random models warn about their configs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def pretend_cuda(monkeypatch):
    """Every backend available, every tensor seen as a CUDA tensor, the CUDA decode checks' device test passed and
    Triton's device test skipped (as under the interpreter): what is left are the real shape/dtype checks."""
    from peft_kernels.ops import _dispatch

    tri = pytest.importorskip("peft_kernels.backends.triton.lora")
    from peft_kernels.backends.cuda import lora as cuda_lora

    monkeypatch.setattr(_dispatch, "unavailable_reason", lambda name: None)
    monkeypatch.setattr(_dispatch, "_device_type", lambda args: "cuda")
    monkeypatch.setattr(cuda_lora, "device_reasons", lambda anchor, **tensors: [])
    monkeypatch.setattr(tri, "interpreting", lambda: True)
    _dispatch.clear_choices()
    yield
    _dispatch.clear_choices()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # tests import the shared helpers (_models, _tolerances, _inputs) by bare name.
    import sys

    here = os.path.dirname(__file__)
    if here not in sys.path:
        sys.path.insert(0, here)
