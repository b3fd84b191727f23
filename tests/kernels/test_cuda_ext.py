"""The CUDA C++ extension peft_kernels._C: it imports without a GPU, describes its build, carries sm_80/sm_90
cubins and PTX, fails with a Python exception (never a crash) when launched without a GPU, and — on a GPU — each
CUDA op matches the reference over awkward shapes (docs/KERNELS.md §11).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fatbin import list_archs
from _tolerances import assert_close_to_ref

from peft_kernels.backends import cuda as cuda_backend
from peft_kernels.backends.cuda import _launch
from peft_kernels.backends.cuda import lora as cuda_lora
from peft_kernels.backends.cuda import lora_int8 as cuda_lora_int8
from peft_kernels.backends.cuda import prefix as cuda_prefix
from peft_kernels.backends.reference import lora_int8 as ref_int8
from peft_kernels.backends.reference import prefix as ref_prefix
from peft_kernels.ops import _dispatch, lora_linear, lora_linear_int8

HAS_CUDA = torch.cuda.is_available()
needs_ext = pytest.mark.skipif(
    cuda_backend.extension_reason() is not None,
    reason=f"{cuda_backend.extension_reason()} (build it: bash .ci/build_ext.sh or pip install -e .)",
)
no_gpu_only = pytest.mark.skipif(HAS_CUDA, reason="checks behaviour without a GPU; this machine has one")
pytestmark = pytest.mark.cuda_ext


def _so_path() -> str:
    return importlib.util.find_spec("peft_kernels._C").origin


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    for root in sys.path:  # the nvidia-cuda-cuobjdump wheel puts the binary under nvidia/cu13/bin/
        for candidate in glob.glob(os.path.join(root, "nvidia", "cu*", "bin", "cuobjdump")):
            return candidate
    return None


# ---- the extension without a GPU ------------------------------------------------------------------------------


def test_import_peft_kernels_never_needs_the_extension():
    """`import peft_kernels` and the ops work with _C made unimportable (a broken build must not break import)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'peft_kernels._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import peft_kernels, peft_kernels.ops\n"
        "from peft_kernels.backends import cuda\n"
        "print(cuda.unavailable_reason())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "blocked for the test" in out.stdout


@needs_ext
def test_build_info_and_dtype_mirror():
    ext = cuda_backend.extension()
    info = ext.build_info()
    assert info["abi_version"] == _launch.ABI_VERSION == ext.ABI_VERSION
    assert info["cuda_runtime_version"] >= 12000
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["nvcc_version"])
    assert info["cuda_archs"] and info["cuda_ptx"]
    assert ext.dtype_codes() == {str(dtype).removeprefix("torch."): code for dtype, code in _launch.DTYPE.items()}


@needs_ext
def test_cubins_and_ptx_present():
    """Every arch build_info names has a cubin in the .nv_fatbin section, the highest one also as PTX."""
    info = cuda_backend.extension().build_info()
    found = list_archs(_so_path())
    built = {int(a.rstrip("a")) for a in info["cuda_archs"].split(";")}
    assert built <= set(found["elf"]), found
    assert int(info["cuda_ptx"]) in found["ptx"], found
    if info["cuda_archs"] == "80;90":  # the default and CI build (.ci/build_ext.sh)
        assert {80, 90} <= set(found["elf"]) and 90 in found["ptx"]


@needs_ext
def test_fatbin_reader_agrees_with_cuobjdump():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or the nvidia-cuda-cuobjdump wheel)")
    listing = subprocess.run([tool, "--list-elf", _so_path()], capture_output=True, text=True, check=True).stdout
    archs = {int(a) for a in re.findall(r"\.sm_(\d+)a?\.cubin", listing)}
    assert archs == set(list_archs(_so_path())["elf"])


@needs_ext
@no_gpu_only
def test_runtime_check_and_backend_reason_without_gpu():
    assert cuda_backend.extension().runtime_check() != ""
    assert "no CUDA device" in cuda_backend.unavailable_reason()


@needs_ext
@no_gpu_only
@pytest.mark.parametrize(
    "name, args",
    [
        (
            "kv_append_launch",
            (256, 256, 256, 256, 1, 1, 1, 8, 4, 0, [32, 32, 8], [32, 32, 8], [8, 8, 8], [8, 8, 8], 2),
        ),
        ("prefix_kv_fill_launch", (256, [256], [256], 1, 1, 2, 8, [32, 16, 16, 8], [32, 32, 8], 1)),
        ("prefix_kv_fill_bwd_launch", ([256], [256], 256, 2, 1, 2, 8, [32, 32, 8, 1], 0)),
        ("lora_shrink_launch", (256, 256, 256, 1, 64, 8, 64, 64, 8, 1, 1)),
        ("lora_linear_fwd_launch", (256, 256, 0, 0, 0, 0, 0, 256, 3, 8, 32, 0, 32, 32, 0, 0, 0, 0, 8, 0, 0, 1.0)),
        (
            "lora_linear_int8_fwd_launch",
            (256, 256, 256, 0, 256, 256, 0, 256, 256, 3, 8, 32, 4, 32, 32, 32, 4, 1, 4, 8, 1, 2, 0.5),
        ),
    ],
)
def test_launch_without_gpu_raises_runtime_error(name, args):
    """Valid arguments pass validation and stop at the device guard: a RuntimeError naming the CUDA error."""
    launcher = getattr(cuda_backend.extension(), name)
    with pytest.raises(RuntimeError, match="CUDA error"):
        launcher(*args, 0, 0)


@needs_ext
def test_launcher_argument_errors_are_value_errors():
    ext = cuda_backend.extension()
    with pytest.raises(ValueError, match="M = 17"):
        ext.lora_linear_int8_fwd_launch(
            256, 256, 256, 0, 0, 0, 0, 0, 256, 17, 8, 32, 0, 32, 32, 0, 0, 0, 0, 8, 0, 0, 1.0, 0, 0
        )
    with pytest.raises(ValueError, match="K = 59"):
        ext.lora_linear_fwd_launch(256, 256, 0, 0, 0, 0, 0, 256, 1, 8, 59, 0, 64, 64, 0, 0, 0, 0, 8, 0, 0, 1.0, 0, 0)
    with pytest.raises(ValueError, match="unknown dtype code 9"):
        ext.kv_append_launch(256, 256, 256, 256, 1, 1, 1, 8, 4, 0, [32] * 3, [32] * 3, [8] * 3, [8] * 3, 9, 0, 0)
    with pytest.raises(ValueError, match="do not fit"):
        ext.kv_append_launch(256, 256, 256, 256, 1, 1, 3, 8, 4, 2, [32] * 3, [32] * 3, [8] * 3, [8] * 3, 2, 0, 0)


def test_arch_coverage_rule():
    assert _launch._arch_runs((8, 6), "80;90", "90") and _launch._arch_runs((8, 9), "80;90", "90")
    assert _launch._arch_runs((9, 0), "80;90", "90") and _launch._arch_runs((12, 0), "80;90", "90")
    assert not _launch._arch_runs((7, 5), "80;90", "90") and not _launch._arch_runs((9, 0), "80", "")
    assert _launch._arch_runs((9, 0), "90a", "") and not _launch._arch_runs((10, 0), "80;90a", "")


# ---- Python wrappers without a GPU: reasons and argument packing ------------------------------------------------


def test_cpu_tensors_are_declined_with_a_reason():
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    args = (x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(8), None, [], [], [], [], [], None)
    assert cuda_lora_int8.not_supported_reasons("lora_linear_int8_fwd", *args) == ["tensors are on cpu, not CUDA"]
    assert "no CUDA C++ kernel" in cuda_lora_int8.not_supported_reasons("lora_linear_int8_bwd", x)[0]


@pytest.fixture
def on_fake_device(monkeypatch):
    """Pretend CPU tensors sit on a usable CUDA device, so the reason logic and argument packing run here."""
    for module in (cuda_lora, cuda_prefix):
        monkeypatch.setattr(module, "device_reasons", lambda anchor, **tensors: [])


def _int8_args(m=3, k=64, n=97, r=17, dtype=torch.bfloat16, adapter_dtype=None, p=0.0, n_adapters=1):
    adapter_dtype = adapter_dtype or dtype
    a = [torch.randn(r, k, dtype=adapter_dtype) for _ in range(n_adapters)]
    b = [torch.randn(n, r, dtype=adapter_dtype) for _ in range(n_adapters)]
    return (
        torch.randn(m, k, dtype=dtype),
        torch.randint(-127, 128, (n, k), dtype=torch.int8),
        torch.rand(n),
        torch.randn(n, dtype=dtype),
        a,
        b,
        [None] * n_adapters,
        [0.5] * n_adapters,
        [p] * n_adapters,
        None,
    )


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, None),
        ({"m": 17}, "M = 17"),
        ({"k": 59}, "K = 59"),
        ({"dtype": torch.float32}, "float16/bfloat16"),
        ({"p": 0.1}, "dropout"),
        ({"n_adapters": 2}, "2 active adapters"),
        ({"adapter_dtype": torch.float16}, "expected both"),
        ({"adapter_dtype": torch.float32}, None),
    ],
)
def test_small_m_reasons(on_fake_device, overrides, expected):
    reasons = cuda_lora_int8.not_supported_reasons("lora_linear_int8_fwd", *_int8_args(**overrides))
    if expected is None:
        assert reasons == []
    else:
        assert any(expected in reason for reason in reasons), reasons


def test_transposed_weight_is_declined(on_fake_device):
    x = torch.randn(2, 64, dtype=torch.float16)
    weight_t = torch.randn(64, 32, dtype=torch.float16).t()  # Conv1D layout: (N, K) view with stride (1, N)
    reasons = cuda_lora.not_supported_reasons("lora_linear_fwd", x, weight_t, None, [], [], [], [], [], None)
    assert any("weight rows" in reason for reason in reasons)


@needs_ext
@no_gpu_only
def test_wrappers_pack_arguments_the_launchers_accept(on_fake_device, monkeypatch):
    """Each wrapper's call passes the C++ validation and reaches the device guard (RuntimeError, not ValueError):
    the Python packing and the launcher signatures agree."""

    def launch_without_torch_cuda(launcher, device, *args):
        launcher(*args, 0, 0)

    for module in (cuda_lora, cuda_prefix):
        monkeypatch.setattr(module, "launch", launch_without_torch_cuda)
    calls = [
        lambda: cuda_lora_int8.lora_linear_int8_fwd(*_int8_args()),
        lambda: cuda_lora_int8.lora_linear_int8_fwd(*_int8_args(r=1, adapter_dtype=torch.float32)),
        lambda: cuda_lora_int8.lora_linear_int8_fwd(*_int8_args(n_adapters=0)),
        lambda: cuda_lora.lora_linear_fwd(
            torch.randn(4, 32, dtype=torch.float16),
            torch.randn(8, 32, dtype=torch.float16),
            None,
            [torch.randn(2, 32, dtype=torch.float16)],
            [torch.randn(8, 2, dtype=torch.float16)],
            [None],
            [1.0],
            [0.0],
            None,
        ),  # fmt: skip
        lambda: cuda_prefix.prefix_kv_fill(
            torch.randn(2, 2, 3, 4, 8), [torch.zeros(2, 3, 9, 8)] * 2, [torch.zeros(2, 3, 9, 8)] * 2
        ),
        lambda: cuda_prefix.kv_append(
            torch.zeros(2, 3, 9, 8), torch.zeros(2, 3, 9, 8), torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8), 4
        ),
        lambda: cuda_prefix.prefix_kv_fill_bwd([torch.randn(2, 3, 9, 8)] * 2, [torch.randn(2, 3, 9, 8)] * 2, 4),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="CUDA error"):
            call()


# ---- on a GPU: every CUDA op against the reference --------------------------------------------------------------

GPU_SMALL_M = [(1, 16, 1, 1), (3, 64, 97, 17), (7, 4096, 431, 8), (16, 1024, 4096, 64), (16, 128, 8, 0)]


def _require_cuda_backend():
    reason = _dispatch.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(reason)


def _dispatched_backend(op_name, *args):
    ops = _dispatch.PRIORITY[_dispatch.ALIASES[op_name][0] if op_name in _dispatch.ALIASES else op_name]
    return next(name for name in ops if not _dispatch.call_reasons(name, op_name, *args))


@pytest.mark.gpu
@pytest.mark.parametrize("m, k, n, r", GPU_SMALL_M)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("adapter_fp32", [False, True])
def test_gpu_lora_int8_fwd_matches_reference(m, k, n, r, dtype, adapter_fp32):
    _require_cuda_backend()
    dev, adt = "cuda", torch.float32 if adapter_fp32 else dtype
    x = torch.randn(m, k + 16, device=dev, dtype=dtype)[:, :k]  # row stride K + 16: not contiguous
    cb = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
    scale = torch.rand(n, device=dev) / 127 / k**0.5
    bias = torch.randn(n, device=dev, dtype=dtype)
    a, b = (
        torch.randn(max(r, 1), k, device=dev, dtype=adt)[:r],
        torch.randn(n, max(r, 1), device=dev, dtype=adt)[:, :r],
    )
    b_bias = torch.randn(n, device=dev, dtype=adt)
    args = (x, cb, scale, bias, [a], [b], [b_bias], [0.7], [0.0], None)
    assert _dispatched_backend("lora_linear_int8_fwd", *args) == "cuda"
    y, (s,) = cuda_lora_int8.lora_linear_int8_fwd(*args)
    eager, (s_eager,) = ref_int8.lora_linear_int8_fwd(*args)
    up = [t.float() for t in (x, bias, a, b, b_bias)]
    truth, (s_truth,) = ref_int8.lora_linear_int8_fwd(
        up[0], cb, scale, up[1], [up[2]], [up[3]], [up[4]], [0.7], [0.0], None
    )
    assert y.dtype == dtype and s.dtype == torch.float32
    assert_close_to_ref(y, eager, truth, dtype, "y")
    assert_close_to_ref(s, s_eager, s_truth, dtype, "S")
    y2, _ = cuda_lora_int8.lora_linear_int8_fwd(*args)
    assert torch.equal(y, y2), "the decode kernels are deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("m, k, n, r", GPU_SMALL_M)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_lora_fwd_matches_reference(m, k, n, r, dtype):
    _require_cuda_backend()
    dev = "cuda"
    x, w = torch.randn(m, k, device=dev, dtype=dtype), torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
    a, b = torch.randn(r, k, device=dev, dtype=dtype), torch.randn(n, r, device=dev, dtype=dtype)
    args = (x, w, None, [a], [b], [None], [2.0], [0.0], None)
    y, _ = cuda_lora.lora_linear_fwd(*args)
    eager, _ = _dispatch.implementation("reference", "lora_linear_fwd")(*args)
    truth = x.float() @ w.float().t() + 2.0 * (x.float() @ a.float().t()) @ b.float().t()
    assert_close_to_ref(y, eager, truth, dtype, "y")


@pytest.mark.gpu
def test_gpu_dispatch_declines_prefill_and_public_api_runs():
    """M = 17 goes past CUDA to the next backend; the public functional ops run end to end on CUDA."""
    _require_cuda_backend()
    dev, dtype = "cuda", torch.bfloat16
    cb = torch.randint(-127, 128, (64, 32), dtype=torch.int8, device=dev)
    scale = torch.rand(64, device=dev) / 127
    a, b = torch.randn(4, 32, device=dev, dtype=dtype), torch.randn(64, 4, device=dev, dtype=dtype)
    x17 = torch.randn(17, 32, device=dev, dtype=dtype)
    assert any(
        "M = 17" in r
        for r in _dispatch.call_reasons(
            "cuda", "lora_linear_int8_fwd", x17, cb, scale, None, [a], [b], [None], [1.0], [0.0], None
        )
    )
    for rows in (1, 17):
        x = torch.randn(rows, 32, device=dev, dtype=dtype)
        ref = lora_linear_int8(x, cb, scale, None, a, b, 1.0, backend="reference")
        out = lora_linear_int8(x, cb, scale, None, a, b, 1.0)
        w_deq = ref_int8.dequantize_int8(cb, scale, torch.float32)
        truth = lora_linear(x.float(), w_deq, None, a.float(), b.float(), 1.0)
        assert_close_to_ref(out, ref, truth, dtype, f"rows={rows}")


PREFIX_SHAPES = [(1, 1, 1, 1, 1, 8), (3, 2, 2, 5, 3, 59), (2, 3, 4, 7, 6, 64), (70, 2, 1, 16, 9, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", PREFIX_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_prefix_ops_bitwise_equal_reference(shape, dtype):
    """fill (70 layers: two launches), append at an offset into sliced buffers, and the batch-sum gradient."""
    _require_cuda_backend()
    n_layers, batch, heads, prefix_len, new, head_dim = shape
    dev, rows = "cuda", prefix_len + new + 3
    prefix = torch.randn(n_layers, 2, heads, prefix_len, head_dim, device=dev).to(dtype)
    parent = torch.full((2, n_layers, batch, heads, rows, head_dim + 1), float("nan"), device=dev, dtype=dtype)
    # Buffers start one element into each parent row: not 16-byte aligned, so the narrow copy units run.
    bufs = [[parent[i, layer, ..., 1:] for layer in range(n_layers)] for i in range(2)]
    expected = [[t.clone() for t in group] for group in bufs]
    cuda_prefix.prefix_kv_fill(prefix, *bufs)
    ref_prefix.prefix_kv_fill(prefix, *expected)
    k, v = (torch.randn(batch, new, heads, head_dim, device=dev).to(dtype).transpose(1, 2) for _ in range(2))
    cuda_prefix.kv_append(bufs[0][-1], bufs[1][-1], k, v, prefix_len)
    ref_prefix.kv_append(expected[0][-1], expected[1][-1], k, v, prefix_len)
    for got, want in zip(bufs[0] + bufs[1], expected[0] + expected[1]):
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    assert parent[..., 0].isnan().all(), "the column before each buffer must stay untouched"

    grads = [[torch.randn(batch, heads, rows, head_dim, device=dev).to(dtype) for _ in range(n_layers)] for _ in "kv"]
    got = cuda_prefix.prefix_kv_fill_bwd(grads[0], grads[1], prefix_len)
    assert torch.equal(got, ref_prefix.prefix_kv_fill_bwd(grads[0], grads[1], prefix_len))
    expanded = [[torch.ones(1, 1, 1, 1, device=dev, dtype=dtype).expand(batch, heads, rows, head_dim)] * n_layers] * 2
    assert torch.equal(cuda_prefix.prefix_kv_fill_bwd(*expanded, prefix_len), torch.full_like(got, batch))


@pytest.mark.gpu
def test_gpu_opcheck():
    _require_cuda_backend()
    dev, dtype = "cuda", torch.bfloat16
    x = torch.randn(2, 64, device=dev, dtype=dtype)
    cb = torch.randint(-127, 128, (40, 64), dtype=torch.int8, device=dev)
    a, b = torch.randn(8, 64, device=dev, dtype=dtype), torch.randn(40, 8, device=dev, dtype=dtype)
    fwd = (x, cb, torch.rand(40, device=dev), None, [a], [b], [None], [0.5], [0.0], None)
    torch.library.opcheck(torch.ops.peft_kernels.lora_linear_int8_fwd.default, fwd)
    prefix = torch.randn(2, 2, 3, 4, 8, device=dev, dtype=dtype)
    k_bufs = [torch.zeros(2, 3, 10, 8, device=dev, dtype=dtype) for _ in range(2)]
    v_bufs = [torch.zeros(2, 3, 10, 8, device=dev, dtype=dtype) for _ in range(2)]
    torch.library.opcheck(torch.ops.peft_kernels.prefix_kv_fill.default, (prefix, k_bufs, v_bufs))
    new = torch.randn(2, 3, 5, 8, device=dev, dtype=dtype)
    torch.library.opcheck(torch.ops.peft_kernels.kv_append.default, (k_bufs[0], v_bufs[0], new, new, 4))
    torch.library.opcheck(torch.ops.peft_kernels.prefix_kv_fill_bwd.default, (k_bufs, v_bufs, 4))


def test_build_script_is_present_and_executable_by_bash():
    script = Path(__file__).resolve().parents[2] / ".ci" / "build_ext.sh"
    if not script.is_file():
        pytest.skip(".ci/build_ext.sh not in this checkout")
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
