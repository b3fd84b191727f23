"""Runs a kernel test file again in a child pytest under the Triton interpreter.

TRITON_INTERPRET must be set before triton is imported, so the interpreter checks of a test file run in a child
process; the parent test fails with the child's output when any of them fails.
"""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_interpreter_suite(test_file: str, timeout: int, **extra_env: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", **extra_env}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(pathlib.Path(test_file)), "-q", "-p", "no:cacheprovider"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"interpreter suite failed:\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
