"""CPU benchmark: one LoRA'd linear, peft 0.21.2's eager layer vs peft_kernels' reference op, side by side.

    python benchmarks/bench_cpu_lora.py [--reps 30] [--out benchmarks/results/cpu.csv]

Both layers share identical weights; every repetition times PEFT then ours back to back (interleaved, so drift
hits both), and the table reports medians with p20/p80 and the ratio of medians ours/peft (< 1 is faster).
FLOPs of fwd+bwd with W frozen: 4MNK + 6Mr(K+N) (base fwd + dx; LoRA fwd, dS, dA, dB, dx-term). CPU numbers
say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
import warnings

import torch
from torch import nn

import peft_kernels as pk

SHAPES = [
    # name, M (tokens), K (in), N (out), r
    ("bert-base query (4x128 tokens)", 512, 768, 768, 16),
    ("gpt2 c_attn (4x128 tokens)", 512, 768, 2304, 8),
    ("llama-1B-like q_proj (2x128 tokens)", 256, 2048, 2048, 16),
]
MODES = [("fwd+bwd", 0.0), ("fwd+bwd dropout 0.1", 0.1), ("no-grad fwd", 0.0)]


class OneLinear(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.lin = nn.Linear(k, n)

    def forward(self, x):
        return self.lin(x)


def build(lib, k, n, r, p):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(
            OneLinear(k, n),
            lib.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["lin"], init_lora_weights=False),
        )
    model.train()
    return model


def step_fn(model, x, dy, mode):
    if mode == "no-grad fwd":

        def run():
            with torch.no_grad():
                model(x)
    else:

        def run():
            x.grad = None
            for p in model.parameters():
                p.grad = None
            model(x).backward(dy)

    return run


def quantiles(samples):
    s = sorted(samples)
    q = statistics.quantiles(s, n=10)
    return statistics.median(s), q[1], q[7]  # p50, p20, p80


def git_sha() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__)
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=None, help="append CSV rows here")
    args = parser.parse_args(argv)
    import peft

    rows = []
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(f"{'shape':<38} {'mode':<22} {'peft ms p50 [p20,p80]':>26} {'ours ms p50 [p20,p80]':>26} {'ours/peft':>9}")
    for name, m, k, n, r in SHAPES:
        for mode, p in MODES:
            theirs = build(peft, k, n, r, p)
            ours = build(pk, k, n, r, p)
            ours.load_state_dict(theirs.state_dict())
            x = torch.randn(m, k, requires_grad=True)
            dy = torch.randn(m, n)
            runs = {"peft": step_fn(theirs, x, dy, mode), "peft_kernels": step_fn(ours, x, dy, mode)}
            times = {key: [] for key in runs}
            for _ in range(args.warmup):
                for fn in runs.values():
                    fn()
            for _ in range(args.reps):
                for key, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[key].append((time.perf_counter() - t0) * 1e3)
            stats = {key: quantiles(v) for key, v in times.items()}
            ratio = stats["peft_kernels"][0] / stats["peft"][0]
            fmt = lambda s: f"{s[0]:8.3f} [{s[1]:.3f},{s[2]:.3f}]"
            print(f"{name:<38} {mode:<22} {fmt(stats['peft']):>26} {fmt(stats['peft_kernels']):>26} {ratio:9.3f}")
            for provider, (p50, p20, p80) in stats.items():
                rows.append(
                    {
                        "op": "lora_linear",
                        "provider": provider,
                        "mode": mode,
                        "shape": name,
                        "M": m,
                        "K": k,
                        "N": n,
                        "r": r,
                        "dropout": p,
                        "p50_ms": f"{p50:.4f}",
                        "p20_ms": f"{p20:.4f}",
                        "p80_ms": f"{p80:.4f}",
                        "ratio_vs_peft": f"{stats[provider][0] / stats['peft'][0]:.4f}",
                        "device": "cpu",
                        "cpu": platform.processor() or platform.machine(),
                        "threads": torch.get_num_threads(),
                        "torch": torch.__version__,
                        "peft": peft.__version__,
                        "peft_kernels": pk.__version__,
                        "git_sha": git_sha(),
                        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    }
                )
    if args.out:
        new = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
