"""Smoke tests of the user-facing tools: ``peft-kernels bench`` (table + CSV + plot), ``demo --tiny``, and
``benchmarks/gpu_suite.sh --dry-run`` (the prepared GPU script must at least plan and import on CPU)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_bench_quick_writes_rows_and_plot(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    from peft_kernels import bench

    monkeypatch.setitem(bench.SHAPES, "cpu", [("tiny", 64, 96, 80, 4)])
    out, png = tmp_path / "rows.csv", tmp_path / "speedup.png"
    assert bench.main(["--device", "cpu", "--reps", "3", "--warmup", "1", "--out", str(out), "--plot", str(png)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("op,provider,mode,shape")
    assert len(lines) == 1 + 2 * len(bench.MODES)  # header + (peft, peft_kernels) per mode
    assert png.stat().st_size > 1000


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
