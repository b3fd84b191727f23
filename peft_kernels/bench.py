"""``peft-kernels bench``: one LoRA'd linear, eager PEFT vs peft_kernels, side by side, with a table and a plot.

    peft-kernels bench [--device cpu|cuda] [--reps 20] [--quick] [--out rows.csv] [--plot speedup.png]

Both layers are built by ``get_peft_model`` on the same one-linear model and share identical weights. Each
repetition times PEFT then peft_kernels back to back (interleaved, so machine drift hits both), and the table
reports medians with p20/p80 and the speedup PEFT p50 / ours p50 (> 1: we are faster). FLOPs of fwd+bwd with W
frozen: 4MNK + 6Mr(K+N). CPU numbers say nothing about GPU speed. Needs ``peft`` installed for the comparison
(``pip install -e ".[test]"``); without it only peft_kernels is timed.
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

# name, M (tokens), K (in), N (out), r
SHAPES = {
    "cpu": [
        ("bert-base query, 4x128 tokens", 512, 768, 768, 16),
        ("gpt2 c_attn, 4x128 tokens", 512, 768, 2304, 8),
        ("llama-1B-like q_proj, 2x128 tokens", 256, 2048, 2048, 16),
    ],
    "cuda": [
        ("llama-3-8B q_proj, 8192 tokens", 8192, 4096, 4096, 16),
        ("llama-3-8B k_proj (GQA), 8192 tokens", 8192, 4096, 1024, 16),
        ("llama-3-8B up_proj, 4096 tokens", 4096, 4096, 14336, 16),
        ("llama-3-8B down_proj, 4096 tokens", 4096, 14336, 4096, 16),
    ],
}
MODES = [("fwd+bwd", 0.0), ("fwd+bwd, dropout 0.1", 0.1), ("no-grad fwd", 0.0)]


class OneLinear(nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        self.lin = nn.Linear(k, n)

    def forward(self, x):
        return self.lin(x)


def build(lib, k, n, r, p, device, dtype):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = lib.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["lin"], init_lora_weights=False)
        model = lib.get_peft_model(OneLinear(k, n).to(device=device, dtype=dtype), config)
    return model.train()


def make_step(model, x, dy, mode):
    params = [p for p in model.parameters() if p.requires_grad]

    if mode == "no-grad fwd":

        def step():
            with torch.no_grad():
                model(x)

    else:

        def step():
            x.grad = None
            for param in params:
                param.grad = None
            model(x).backward(dy)

    return step


def timed(step, device) -> float:
    """Milliseconds of one call (CUDA: synchronized before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    deciles = statistics.quantiles(sorted(samples), n=10)
    return statistics.median(samples), deciles[1], deciles[7]


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def run(device: torch.device, reps: int, warmup: int, quick: bool, progress: bool = True) -> list[dict]:
    import peft_kernels as pk

    try:
        import peft
    except ImportError:
        peft = None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SHAPES[device.type][:1] if quick else SHAPES[device.type]
    cases = [(shape, mode) for shape in shapes for mode in MODES]
    rows = []
    try:
        from tqdm.auto import tqdm

        iterator = tqdm(cases, desc="bench", unit="case", disable=not progress)
    except ImportError:
        iterator = cases
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for (name, m, k, n, r), (mode, p) in iterator:
        providers = {"peft_kernels": build(pk, k, n, r, p, device, dtype)}
        if peft is not None:
            providers = {"peft": build(peft, k, n, r, p, device, dtype), **providers}
            providers["peft_kernels"].load_state_dict(providers["peft"].state_dict())
        x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(m, n, device=device, dtype=dtype)
        steps = {key: make_step(model, x, dy, mode) for key, model in providers.items()}
        times = {key: [] for key in steps}
        for _ in range(warmup):
            for step in steps.values():
                step()
        for _ in range(reps):
            for key, step in steps.items():
                times[key].append(timed(step, device))
        stats = {key: quantiles(values) for key, values in times.items()}
        flops = 2 * m * n * k + 2 * m * r * (k + n)
        if mode != "no-grad fwd":
            flops += 2 * m * n * k + 4 * m * r * (k + n)
        for key, (p50, p20, p80) in stats.items():
            speedup = stats["peft"][0] / p50 if "peft" in stats else float("nan")
            rows.append(
                {
                    "op": "lora_linear",
                    "provider": key,
                    "mode": mode,
                    "shape": name,
                    "M": m,
                    "K": k,
                    "N": n,
                    "r": r,
                    "dropout": p,
                    "dtype": str(dtype).replace("torch.", ""),
                    "p50_ms": round(p50, 4),
                    "p20_ms": round(p20, 4),
                    "p80_ms": round(p80, 4),
                    "tflops": round(flops / (p50 * 1e-3) / 1e12, 4),
                    "speedup_vs_peft": round(speedup, 4),
                    "device": device_name(device),
                    "torch": torch.__version__,
                    "peft": getattr(peft, "__version__", "not installed"),
                    "peft_kernels": pk.__version__,
                    "git_sha": git_sha(),
                    "timestamp": stamp,
                    "reps": reps,
                }
            )
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':<38} {'mode':<22} {'peft ms p50 [p20, p80]':>26} {'ours ms p50 [p20, p80]':>26} {'speedup':>8}")
    by_case: dict = {}
    for row in rows:
        by_case.setdefault((row["shape"], row["mode"]), {})[row["provider"]] = row
    for (shape, mode), providers in by_case.items():
        fmt = lambda r: f"{r['p50_ms']:9.3f} [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]" if r else "-"
        ours = providers["peft_kernels"]
        print(
            f"{shape:<38} {mode:<22} {fmt(providers.get('peft')):>26} {fmt(ours):>26} {ours['speedup_vs_peft']:8.3f}"
        )


def write_csv(rows: list[dict], path: str) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in rows if r["provider"] == "peft_kernels"]
    shapes = list(dict.fromkeys(r["shape"] for r in ours))
    modes = list(dict.fromkeys(r["mode"] for r in ours))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = [next(r["speedup_vs_peft"] for r in ours if r["shape"] == s and r["mode"] == mode) for s in shapes]
        ax.bar([j + i * width for j in range(len(shapes))], values, width, label=mode)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(shapes))], shapes, fontsize=8)
    ax.set_ylabel("speedup vs PEFT (PEFT p50 / ours p50)")
    ax.set_title(f"one LoRA'd linear, {ours[0]['device']}, {ours[0]['dtype']}, peft {ours[0]['peft']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="peft-kernels bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the first shape only")
    parser.add_argument("--out", default=None, help="append CSV rows to this file")
    parser.add_argument("--plot", default="peft_kernels_bench.png", help="PNG of the speedups ('' to skip)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device (torch.cuda.is_available() is False)")
    rows = run(device, args.reps, args.warmup, args.quick)
    print(f"device: {rows[0]['device']}; torch {torch.__version__}; peft {rows[0]['peft']}; reps {args.reps}")
    print_table(rows)
    if args.out:
        write_csv(rows, args.out)
        print(f"wrote {len(rows)} rows to {args.out}")
    if args.plot and rows[0]["peft"] != "not installed":
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
