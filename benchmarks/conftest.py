"""pytest options of the benchmark suite (``python -m pytest benchmarks/ --benchmark-only``)."""

import os
import sys

# The tolerance table lives with the tests (tests/_tolerances.py): one table for the whole repository.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def pytest_addoption(parser):
    parser.addoption(
        "--bench-size",
        default="quick",
        choices=("tiny", "quick", "full"),
        help="which cases of peft_kernels.bench.cases.select_cases to run (default: quick)",
    )
    parser.addoption(
        "--bench-ops", default=None, help="comma-separated ops (lora_linear,lora_linear_int8,prefix_kv; default: all)"
    )


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        import torch

        from peft_kernels.bench.cases import OPS, select_cases

        ops_option = metafunc.config.getoption("--bench-ops")
        ops = tuple(ops_option.split(",")) if ops_option else OPS
        device = "cuda" if torch.cuda.is_available() else "cpu"
        cases = select_cases(device, metafunc.config.getoption("--bench-size"), ops)
        metafunc.parametrize("case", cases, ids=[case.label.replace(" ", "-") for case in cases])
