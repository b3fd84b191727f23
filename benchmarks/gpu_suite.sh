#!/usr/bin/env bash
# The one prepared GPU script: build the CUDA extension, run the GPU tests, run the key benchmarks.
#
#   bash benchmarks/gpu_suite.sh OUTDIR            # on a CUDA machine (no network needed), 8 min worst case on an H200 (every step has a timeout)
#   bash benchmarks/gpu_suite.sh OUTDIR --dry-run  # anywhere: prints the plan, checks every script imports
#
# Everything it measures lands in OUTDIR: env.txt (GPU, driver, versions, git sha, date), build.log,
# pytest_gpu.log, bench_*.csv and bench_*.log. Copy the CSVs to benchmarks/results/<gpu>.csv with the card,
# versions and date; never edit a number by hand. The repo runs from its source tree (PYTHONPATH), so the
# machine's own torch/triton/transformers/peft are used; a missing package can be carried as wheels in .whl/
# (installed to /tmp/site when present).
set -uo pipefail
OUT="${1:?usage: gpu_suite.sh OUTDIR [--dry-run]}"
DRY="${2:-}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
start=$(date +%s)
step() { echo "=== $* ($(( $(date +%s) - start )) s) ===" | tee -a "$OUT/suite.log"; }
failures=0

PLAN=(
  "env: nvidia-smi, versions, peft-kernels info -> env.txt"
  "budget: every step has a timeout (120+120+150+45+45 s = 8 min worst case); benchmarks run --quick"
  "build: setup.py build_ext --inplace (sm_90 only, MAX_JOBS=16) -> build.log"
  "tests: pytest -m gpu -x (timeout 120 s) -> pytest_gpu.log"
  "bench: peft-kernels bench --device cuda --size quick (LoRA, int8 LoRA, prefix K/V ops; providers peft, reference, triton, cuda; rows written per case; timeout 150 s) -> bench_ops.csv, bench_ops.png"
  "bench: benchmarks/bench_prefix.py --gpu --reps 5 (B=8, T=2048, P=32; 256-token generation; timeout 45 s) -> bench_prefix.csv"
  "bench: benchmarks/bench_lora_int8.py --quick (W8A16 decode M=1 under CUDA graphs, L2-cold weights; timeout 45 s) -> bench_lora_int8.csv"
)
if [[ "$DRY" == "--dry-run" ]]; then
  echo "gpu_suite plan (OUTDIR=$OUT):"
  printf '  %s\n' "${PLAN[@]}"
  "$PY" -c "import peft_kernels, peft_kernels.cli; print('ok: peft_kernels imports', peft_kernels.__version__)" || exit 1
  for script in benchmarks/bench_prefix.py benchmarks/bench_lora_int8.py; do
    "$PY" "$script" --dry-run > "$OUT/$(basename "$script" .py)_plan.txt" || { echo "$script --dry-run failed"; exit 1; }
    echo "ok: $script --dry-run"
  done
  "$PY" -c "from peft_kernels.bench.cases import select_cases as s; print(len(s('cuda', 'quick')), 'op cases')" \
    > "$OUT/bench_ops_plan.txt" || { echo "op suite plan failed"; exit 1; }
  echo "ok: peft-kernels bench plan ($(cat "$OUT/bench_ops_plan.txt"))"
  echo "dry run ok"
  exit 0
fi

step "env"
{ nvidia-smi; date -u; git rev-parse HEAD 2>/dev/null; "$PY" -m peft_kernels.cli info; } > "$OUT/env.txt" 2>&1
step "build the extension (sm_90)"
PEFT_KERNELS_CUDA_ARCHS="90" MAX_JOBS="${MAX_JOBS:-16}" timeout 120 "$PY" setup.py build_ext --inplace \
  > "$OUT/build.log" 2>&1 || { echo "build failed (see build.log)"; failures=$((failures + 1)); }
"$PY" -m peft_kernels.cli info >> "$OUT/env.txt" 2>&1
step "GPU tests"
timeout 120 "$PY" -m pytest -m gpu -x -q -p no:cacheprovider tests > "$OUT/pytest_gpu.log" 2>&1 \
  || { echo "GPU tests failed (see pytest_gpu.log)"; failures=$((failures + 1)); }
tail -3 "$OUT/pytest_gpu.log"
step "op benchmarks"
# reference+compile is left to full runs: inductor's compilations would eat this step's budget.
timeout 150 "$PY" -m peft_kernels.cli bench --device cuda --size quick --providers peft,reference,triton,cuda \
  --no-progress --out "$OUT/bench_ops.csv" \
  --plot "$OUT/bench_ops.png" > "$OUT/bench_ops.log" 2>&1 \
  || { echo "op benchmarks failed (see bench_ops.log)"; failures=$((failures + 1)); }
step "prefix benchmark"
timeout 45 "$PY" benchmarks/bench_prefix.py --gpu --reps 5 --out "$OUT/bench_prefix.csv" > "$OUT/bench_prefix.log" 2>&1 \
  || { echo "bench_prefix failed (see bench_prefix.log)"; failures=$((failures + 1)); }
step "int8 LoRA decode benchmark"
timeout 45 "$PY" benchmarks/bench_lora_int8.py --quick --modes decode --out "$OUT/bench_lora_int8.csv" \
  > "$OUT/bench_lora_int8.log" 2>&1 || { echo "bench_lora_int8 failed (see bench_lora_int8.log)"; failures=$((failures + 1)); }
step "done with $failures failure(s)"
exit "$failures"
