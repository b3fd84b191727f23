"""Issue #18 item 3: ``peft_kernels.helpers``, ``peft_kernels.import_utils`` and ``peft_kernels.config.__version__``
against real peft 0.21.2."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from _tolerances import FP32_SAME_MATH, assert_close
from torch import nn

import peft_kernels as pk
from peft_kernels import helpers, import_utils

pytestmark = pytest.mark.usefixtures("one_thread_quiet")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _pair(dtype=torch.float32):
    peft = pytest.importorskip("peft")
    base = _mlp().to(dtype)
    config = dict(target_modules=["0", "2"], r=4, lora_alpha=8, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(**config))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.oracle
def test_check_if_peft_model_matches_peft(tmp_path):
    from peft.helpers import check_if_peft_model as peft_check

    _, ours = _pair()
    ours.save_pretrained(tmp_path / "adapter")
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "adapter", tmp_path / "empty"):
        assert helpers.check_if_peft_model(str(path)) == peft_check(str(path))
    assert helpers.check_if_peft_model(str(tmp_path / "adapter")) is True


@pytest.mark.oracle
def test_rescale_adapter_scale_matches_peft():
    from peft.helpers import rescale_adapter_scale as peft_rescale

    theirs, ours = _pair()
    x = torch.randn(4, 6)
    with torch.no_grad():
        before = ours(x)
        with peft_rescale(theirs, 0.25), helpers.rescale_adapter_scale(ours, 0.25):
            scaled = ours(x)
            assert_close(scaled, theirs(x), FP32_SAME_MATH, "rescaled")
            assert ours.base_model.model[0].scaling["default"] == 0.5
        assert not torch.allclose(scaled, before)
        assert_close(ours(x), before, (0.0, 0.0), "restored")
        with pytest.raises(RuntimeError), helpers.rescale_adapter_scale(ours, 0.0):
            raise RuntimeError("restored on error too")
        assert ours.base_model.model[0].scaling["default"] == 2.0
    with pytest.raises(TypeError, match="multiplier should be of type float"):
        with helpers.rescale_adapter_scale(ours, "2"):
            pass
    with pytest.raises(ValueError, match="only supported for models with `LoraLayer`s"):
        with helpers.rescale_adapter_scale(_mlp(), 2.0):
            pass


@pytest.mark.oracle
def test_disable_input_dtype_casting_matches_peft():
    from peft.helpers import disable_input_dtype_casting as peft_disable

    theirs, ours = _pair(torch.bfloat16)  # bf16 base; adapters stay fp32 (autocast_adapter_dtype)
    assert ours.base_model.model[0].lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        assert_close(ours(x).float(), theirs(x).float(), (1.6e-2, 1.6e-2), "cast")
        errors = []
        for model, disable in ((theirs, peft_disable), (ours, helpers.disable_input_dtype_casting)):
            with disable(model), pytest.raises(RuntimeError) as info:
                model(x)  # a bf16 input into an fp32 adapter without the cast: a dtype error
            errors.append(type(info.value))
        assert errors[0] is errors[1]
        assert ours.base_model.model[0].cast_input_dtype_enabled is True  # restored
        with helpers.disable_input_dtype_casting(ours, active=False):
            ours(x)


@pytest.mark.oracle
def test_update_signature_copies_base_forward_doc():
    from peft.helpers import update_signature as peft_update

    class Documented(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            """Documented forward."""
            return self.lin(input_ids)

    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel(Documented(), peft.LoraConfig(target_modules=["lin"]))
    ours = pk.PeftModel(Documented(), pk.LoraConfig(target_modules=["lin"]))
    peft_update(theirs, "forward")
    helpers.update_signature(ours, "forward")
    assert ours.forward.__doc__ == theirs.forward.__doc__ == "Documented forward."
    with pytest.raises(ValueError, match="not supported"):
        helpers.update_signature(ours, "backward")


@pytest.mark.oracle
def test_import_utils_and_config_version_match_peft():
    peft = pytest.importorskip("peft")
    import peft.import_utils as peft_import_utils

    public = {n for n, v in vars(peft_import_utils).items() if n.startswith("is_") and not inspect.ismodule(v)}
    public.discard("is_transformers_dtensor_tp")  # a probe of a transformers internal, not an availability check
    assert public <= set(vars(import_utils)), public - set(vars(import_utils))
    for name in sorted(public):
        ours, theirs = getattr(import_utils, name), getattr(peft_import_utils, name)
        if name == "is_gptqmodel_available":
            continue  # PEFT's raises ImportError for old versions; the package is absent here anyway
        assert (ours() if callable(ours) else ours) == (theirs() if callable(theirs) else theirs), name
    from peft_kernels import config as pk_config

    assert pk_config.__version__ == pk.__version__
    assert peft.config.__version__ == peft.__version__


def test_peft_type_to_prefix_mapping_matches_peft():
    # PEFT's own tests and code look a method's parameter prefix up here (e.g. low_cpu_mem_usage checks).
    peft_mapping = pytest.importorskip("peft.mapping").PEFT_TYPE_TO_PREFIX_MAPPING
    from peft_kernels.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    assert {str(k.value) for k in PEFT_TYPE_TO_PREFIX_MAPPING} == {
        "LORA",
        "PREFIX_TUNING",
        "PROMPT_TUNING",
        "P_TUNING",
    }
    for peft_type, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        assert prefix == peft_mapping[peft_type]
