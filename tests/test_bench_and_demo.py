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


def _suite_dry_run(tmp_path, *args):
    return subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), str(tmp_path), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gpu_suite_dry_run(tmp_path):
    """The plan imports, its fast-pass test ids collect, and the step timeouts add up to at most 8 minutes, in the
    priority order (build, fast correctness, headline benchmark rows, the rest)."""
    result = _suite_dry_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dry run ok" in result.stdout
    steps = [line.split() for line in result.stdout.splitlines() if line.startswith("  ") and " s  " in line]
    names, seconds = [s[0] for s in steps], [int(s[1]) for s in steps]
    assert names[:5] == ["env", "build", "tests_fast", "bench_headline", "tests_rest"], names
    assert 0 < sum(seconds) <= 480, seconds
    assert f"total of step timeouts: {sum(seconds)} s" in result.stdout
    assert os.listdir(tmp_path) == []  # a dry run leaves nothing behind


def test_gpu_suite_budget_scales_and_is_enforced(tmp_path):
    result = _suite_dry_run(tmp_path, "--budget", "240")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line.split() for line in result.stdout.splitlines() if line.startswith("  ") and " s  " in line]
    assert sum(int(s[1]) for s in steps) <= 240
    assert "budget ok" in result.stdout
