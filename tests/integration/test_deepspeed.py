"""Issue #8 part 5: DeepSpeed ZeRO-3 through Trainer, on CPU (DeepSpeed's CPU accelerator, gloo), 2 processes.

DeepSpeed is not in the [test] extra: PyPI has only an sdist (0.19.8 at the time of writing), which builds
with ``DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed`` (plus hjson, msgpack, py-cpuinfo, einops) and
then runs ZeRO-3 on CPU, JIT-compiling its shared-memory comm op with the system C++ compiler on first use.
Without it this test is skipped.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (sdist only on PyPI; see this file's docstring to install it for CPU)",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_zero3_example_trains_and_saves_the_adapter(tmp_path):
    out = tmp_path / "zero3"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        os.path.join(ROOT, "examples", "deepspeed_zero3.py"),
        "--cpu",
        "--steps=4",
        f"--out={out}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "reloaded adapter: PeftModelForCausalLM default" in proc.stdout

    for folder in (out, out / "checkpoint-4"):
        files = set(os.listdir(folder))
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files, files
        assert not files & {"model.safetensors", "pytorch_model.bin"}, files
        tensors = load_file(folder / "adapter_model.safetensors")
        # Gathered from the ZeRO-3 partitions: full (r, in) / (out, r) shapes, trained (nonzero) values.
        assert sorted({tuple(t.shape) for t in tensors.values()}) == [(8, 64), (32, 8), (64, 8)]
        assert all(t.abs().sum() > 0 for t in tensors.values())
    with open(out / "adapter_config.json") as f:
        assert json.load(f)["r"] == 8
    # Trainer treats the model as a PEFT model: the DeepSpeed checkpoint leaves the frozen base out.
    states = out / "checkpoint-4" / "global_step4" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    assert states.stat().st_size < 64 * 1024, "frozen base weights were excluded from the ZeRO checkpoint"
