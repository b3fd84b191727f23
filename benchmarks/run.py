"""The benchmark runner: ``peft-kernels bench`` with its rows appended to ``benchmarks/results/<device>.csv`` and its
plot next to them (``<device>.png``). Every option of ``peft-kernels bench`` passes through.

    python benchmarks/run.py                          # this device, --size quick
    python benchmarks/run.py --size full --reps 20    # every shape (minutes on a GPU, long on a CPU)
    python benchmarks/run.py --ops prefix_kv --out /tmp/rows.csv --plot /tmp/rows.png
"""

import argparse
import os
import sys

import torch

from peft_kernels.bench import main, measure

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    argv = sys.argv[1:]
    # The device peft-kernels bench will run on: --device if given, else CUDA when available (its default).
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    slug = measure.device_slug(torch.device(pre.parse_known_args(argv)[0].device))
    if "--out" not in argv:
        argv += ["--out", os.path.join(RESULTS, f"{slug}.csv")]
    if "--plot" not in argv:
        argv += ["--plot", os.path.join(RESULTS, f"{slug}.png")]
    raise SystemExit(main(argv))
