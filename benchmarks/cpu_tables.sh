#!/usr/bin/env bash
# The README's CPU tables, end to end: the three committed CPU measurements with the reps the README states, their
# rows appended to benchmarks/results/{cpu,cpu_e2e,cpu_prefix}.csv, then the tables printed in markdown
# (benchmarks/readme_tables.py). Run it on a quiet machine, from the repository root or anywhere:
#
#     benchmarks/cpu_tables.sh                  # THREADS=1 (torch intra-op threads), RESULTS=benchmarks/results
#     RESULTS=/tmp/rows benchmarks/cpu_tables.sh   # rows elsewhere (the committed CSVs untouched)
#
# Each step's output goes to a log file (LOG, default a mktemp file) and its wall time to stderr; the tables go to
# stdout. Cost on a quiet 2-core box (THREADS=1, 2026-12-06, ffe6310): ops 122 s (31 rounds), end to end 160 s and
# prefix 345 s, so ~11 min of wall time; a loaded box takes two to three times that.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
THREADS="${THREADS:-1}"
RESULTS="${RESULTS:-benchmarks/results}"
export OMP_NUM_THREADS="$THREADS"  # bench_e2e.py has no --threads: torch takes its thread count from here
mkdir -p "$RESULTS"
LOG="${LOG:-$(mktemp -t cpu_tables.XXXXXX.log)}"  # the steps' own output (outside the repository)
echo "step output: $LOG" >&2

step() {
    local start=$SECONDS
    echo "== $*" | tee -a "$LOG" >&2
    "$@" >>"$LOG" 2>&1 || { echo "failed: $* (see $LOG)" >&2; exit 1; }
    echo "== $(( SECONDS - start )) s" | tee -a "$LOG" >&2
}

# Ops: PEFT, the reference backend, torch.compile of its formula and the base GEMM alone (the ceiling) on the quick
# shapes, 31 interleaved rounds (README: --reps 31).
step python benchmarks/run.py --device cpu --size quick --reps 31 --threads "$THREADS" --no-progress \
    --out "$RESULTS/cpu.csv" --plot "$RESULTS/cpu.png"
# End to end: LoRA (dropout 0.05 and 0), patch_peft(), int8, QLoRA, prefix on the Llama-style model.
step python benchmarks/bench_e2e.py --steps 10 --decode-reps 5 --out "$RESULTS/cpu_e2e.csv"
# Prefix tuning on a whole model: training step and per generated token at three sizes. 15 rounds: both libraries
# run the same model work, so the ratio sits at ~1.00 and its median needs the rounds (5 moved it by ±3%).
step python benchmarks/bench_prefix.py --shapes 1x64x16 4x128x16 8x256x32 --reps 15 --threads "$THREADS" \
    --out "$RESULTS/cpu_prefix.csv"
python benchmarks/readme_tables.py --ops "$RESULTS/cpu.csv" --e2e "$RESULTS/cpu_e2e.csv" \
    --prefix "$RESULTS/cpu_prefix.csv"
