"""CPU benchmark of one LoRA'd linear, peft 0.21.2 vs peft_kernels: ``peft-kernels bench --device cpu``.

python benchmarks/bench_cpu_lora.py [--reps 30] [--out benchmarks/results/cpu.csv] [--plot cpu.png]
"""

from peft_kernels.bench import main

if __name__ == "__main__":
    raise SystemExit(main(["--device", "cpu", *__import__("sys").argv[1:]]))
