"""Smoke tests of the user-facing tools: ``demo --tiny`` and
``benchmarks/gpu_suite.sh --dry-run`` (the prepared GPU script must at least plan and import on CPU)."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_demo_tiny_runs_and_reloads():
    result = subprocess.run(
        [sys.executable, "-m", "peft_kernels.cli", "demo", "--tiny", "--steps", "3", "--timing-steps", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accuracy after 3 LoRA steps" in result.stdout
    assert "reloaded adapter gives identical predictions: True" in result.stdout


def test_gpu_suite_dry_run(tmp_path):
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), str(tmp_path), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dry run ok" in result.stdout
