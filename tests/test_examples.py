"""Every example under examples/ runs end to end with --smoke (2-3 steps on tiny random models) in a subprocess.

Each example trains, saves, reloads onto a fresh base and checks identical predictions itself (non-zero exit
otherwise); the test also reads its verdict lines. Optional dependencies skip their example with a reason.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")

# (script, extra arguments, optional dependency, lines the output must contain)
EXAMPLES = [
    ("image_classification_lora.py", [], None, ["identical predictions: True", "merged model matches: True"]),
    ("semantic_segmentation_lora.py", [], None, ["identical predictions: True", "merged model matches: True"]),
    ("token_classification_lora.py", [], None, ["identical predictions: True", "merged model matches: True"]),
    ("whisper_int8_lora.py", [], "bitsandbytes", ["identical predictions: True"]),
    ("qlora_llama.py", [], "bitsandbytes", ["identical predictions: True", "merged model matches: True"]),
    (
        "dreambooth_lora.py",
        ["--lora-convs"],  # the UNet's conv layers too: lora.Conv2d on both the eager and the 1×1 fused path
        "diffusers",
        ["identical predictions: True", "merged models match: True", "sampled one image"],
    ),
]


@pytest.mark.parametrize("script,extra,needs,expected", EXAMPLES, ids=[e[0].removesuffix(".py") for e in EXAMPLES])
def test_example_smoke(script, extra, needs, expected, tmp_path):
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{script} needs {needs}, which is not installed (pip install {needs})")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), "--smoke", "--device", "cpu", "--out", str(tmp_path)]
        + extra,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        # One thread: tiny tensors on a shared 2-core machine; offline: the examples never reach a hub.
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for line in expected:
        assert line in result.stdout, f"{line!r} missing from:\n{result.stdout[-2000:]}"
    assert os.listdir(tmp_path), "the adapter was saved"
