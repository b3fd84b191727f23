#!/usr/bin/env bash
# The one prepared GPU script: build the CUDA extension, check correctness, run the key benchmarks, in that order
# of priority, within a total budget (8 min of step timeouts by default) so a 10-minute GPU loan returns results.
#
#   bash benchmarks/gpu_suite.sh OUTDIR                   # on a CUDA machine (no network needed)
#   bash benchmarks/gpu_suite.sh OUTDIR --budget 300      # every step's timeout scaled by 300/480
#   bash benchmarks/gpu_suite.sh OUTDIR --dry-run         # anywhere: the plan, the budget check, the imports, and
#                                                         # the fast pass's test ids collected
#
# Order (cheap and most important first): env; build _C; one fast correctness pass per op (a handful of cases,
# autotuning restricted to each list's first config by PEFT_KERNELS_AUTOTUNE=first); the headline benchmark rows
# (LoRA linear M=8192, K=N=4096, r=16, bf16 with fp32 adapters: fwd, bwd, fwd+bwd vs PEFT); the remaining GPU tests
# (the 4-bit kernels' among them); the QLoRA rows (the 4-bit op at M=4096 and M=1, then the e2e qlora step vs
# PEFT+bnb);
# the other benchmarks. Every step has a timeout and writes as it goes: pytest -v with --junitxml and
# --durations=20 (a killed step still names what passed), benchmark CSVs appended per case / per mode, steps.csv one
# row per finished step. TRITON_PRINT_AUTOTUNING=1 puts each autotuner's choice in the step logs.
#
# Output: everything is written under OUTDIR/suite/ and packed into ONE file, OUTDIR/gpu_suite.tar.gz, at exit,
# also when a step is killed or the script is interrupted (then OUTDIR/suite/ is removed: the tar holds it all).
# Read it with `tar xzf OUTDIR/gpu_suite.tar.gz`. Copy the CSVs to benchmarks/results/<gpu>.csv with the card,
# versions and date; never edit a number by hand. The estimates to compare against are docs/GPU_READINESS.md.
# The repo runs from its source tree (PYTHONPATH), so the machine's own torch/triton/transformers/peft are used; a
# missing package can be carried as wheels in .whl/ (installed to /tmp/site when present).
set -uo pipefail
OUTDIR="${1:?usage: gpu_suite.sh OUTDIR [--dry-run] [--budget SECONDS]}"
shift
DRY=0
BUDGET=480
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
OUT="$OUTDIR/suite"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
PY="${PYTHON:-python3}"

# ---- the plan: name | base budget (s, at BUDGET=480) | what
STEPS=(
  "env|15|nvidia-smi, versions, peft-kernels info -> env.txt"
  "build|70|setup.py build_ext --inplace (sm_90, MAX_JOBS=16), then peft-kernels info -> build.log"
  "tests_fast|85|pytest -v, one fast correctness pass per op (FAST_TESTS), PEFT_KERNELS_AUTOTUNE=first -> tests_fast.{log,xml}"
  "bench_headline|60|peft-kernels bench --ops lora_linear --modes fwd+bwd,fwd,bwd --providers peft,triton (M=8192 K=N=4096 r=16 bf16 first) -> bench_headline.csv"
  "tests_rest|50|pytest -m gpu -v, cheap files first, test_ops_lora last, PEFT_KERNELS_AUTOTUNE=first -> tests_rest.{log,xml}"
  "bench_qlora|35|python -m peft_kernels.bench.qlora (decode M=1 K=N=4096 under a CUDA graph, L2-cold: GB/s of the packed weight, HBM fraction, vs peft+bnb) -> bench_qlora_decode.csv; peft-kernels bench --ops lora_linear_4bit --providers peft,triton (M=4096 fwd+bwd/fwd/bwd, M=1) -> bench_qlora.csv"
  "e2e_qlora|35|benchmarks/bench_e2e.py --device cuda --methods qlora --steps 3 (step time, peak memory, decode tokens/s vs PEFT+bnb) -> bench_e2e_qlora.csv"
  "bench_ops|45|peft-kernels bench --ops lora_linear_int8,prefix_kv, then lora_linear no-grad-fwd and the reference providers -> bench_ops.csv"
  "bench_prefix|35|benchmarks/bench_prefix.py --gpu --reps 3 (B=8, T=2048, P=32; 16/64-token decode; rows per mode) -> bench_prefix.csv"
  "bench_int8|35|benchmarks/bench_lora_int8.py --quick --modes decode (W8A16 M=1 under CUDA graphs) -> bench_lora_int8.csv"
  "bench_mixed|15|peft-kernels bench --ops lora_linear_mixed (8 adapters, M in {8,64,512}), then bench_mixed_serving.py -> bench_mixed_*.csv"
)
# The fast correctness pass: per op a handful of cases (Triton LoRA: headline dtypes with dropout, decode, an awkward
# shape; int8; the CUDA extension; prefix K/V).
FAST_TESTS=(
  "tests/kernels/test_cuda_ext.py::test_gpu_dispatch_declines_prefill_and_public_api_runs"
  "tests/kernels/test_cuda_ext.py::test_gpu_lora_fwd_matches_reference"
  "tests/kernels/test_ops_lora.py::test_backend_matches_reference_cuda[llama-q-4096-r16-bf16-fp32adapters-p0.1-triton]"
  "tests/kernels/test_ops_lora.py::test_backend_matches_reference_cuda[decode-1x4096x4096-r16-bf16-triton]"
  "tests/kernels/test_ops_lora.py::test_backend_matches_reference_cuda[m4097-k123-n431-r17-bf16-p0.1-triton]"
  "tests/kernels/test_triton_int8.py::test_triton_int8_matches_reference_cuda[llama-q-4096-r16-bf16-fp32adapters-p0.1]"
  "tests/kernels/test_triton_int8.py::test_triton_int8_matches_reference_cuda[decode-1x4096x4096-r16-bf16]"
  "tests/kernels/test_triton_prefix.py::test_gpu_cache_on_a_model"
  "tests/kernels/test_ops_prefix.py::test_noncontiguous_buffers_and_inputs"
)
REST_FILES=(tests/kernels/test_cuda_ext.py tests/kernels/test_triton_prefix.py tests/kernels/test_ops_prefix.py
  tests/kernels/test_triton_int8.py tests/kernels/test_ops_lora_int8.py tests/kernels/test_dropout.py
  tests/kernels/test_triton_4bit.py tests/kernels/test_ops_lora.py)

budget_of() {  # scaled timeout of a base budget, floored so the scaled steps never exceed --budget (min 1 s:
  local t=$(( $1 * BUDGET / 480 ))  # `timeout 0` would mean no timeout)
  echo $(( t < 1 ? 1 : t ))
}

total=0
plan=""
for s in "${STEPS[@]}"; do
  IFS='|' read -r name base what <<< "$s"
  t=$(budget_of "$base")
  total=$((total + t))
  plan+=$(printf '  %-15s %4d s  %s' "$name" "$t" "$what")$'\n'
done

if [[ "$DRY" == 1 ]]; then
  echo "gpu_suite plan (OUTDIR=$OUTDIR, budget $BUDGET s; steps in order, timeouts):"
  printf '%s' "$plan"
  echo "total of step timeouts: $total s (budget $BUDGET s)"
  if (( total > BUDGET )); then echo "budget exceeded: $total s > $BUDGET s"; exit 1; fi
  echo "budget ok: $total s <= $BUDGET s"
  "$PY" -c "import peft_kernels, peft_kernels.cli; print('ok: peft_kernels imports', peft_kernels.__version__)" || exit 1
  for script in benchmarks/bench_prefix.py benchmarks/bench_lora_int8.py benchmarks/bench_mixed_serving.py; do
    "$PY" "$script" --dry-run > "$OUT/$(basename "$script" .py)_plan.txt" || { echo "$script --dry-run failed"; exit 1; }
    echo "ok: $script --dry-run"
  done
  "$PY" benchmarks/bench_e2e.py --device cuda --methods qlora --steps 3 --dry-run > "$OUT/bench_e2e_qlora_plan.txt" \
    || { echo "benchmarks/bench_e2e.py --dry-run failed"; exit 1; }
  echo "ok: benchmarks/bench_e2e.py --dry-run (qlora)"
  "$PY" -c "from peft_kernels.bench.cases import select_cases as s; print(len(s('cuda', 'quick')), 'op cases')" \
    > "$OUT/bench_ops_plan.txt" || { echo "op suite plan failed"; exit 1; }
  echo "ok: peft-kernels bench plan ($(cat "$OUT/bench_ops_plan.txt"))"
  # every fast-pass id must exist (a renamed case would make the step collect nothing)
  "$PY" -m pytest --collect-only -q -p no:cacheprovider "${FAST_TESTS[@]}" > "$OUT/tests_fast_collect.txt" 2>&1 \
    || { echo "fast-pass test ids do not collect:"; tail -20 "$OUT/tests_fast_collect.txt"; exit 1; }
  echo "ok: fast pass collects $(grep -c '::' "$OUT/tests_fast_collect.txt") tests"
  rm -rf "$OUT"
  echo "dry run ok"
  exit 0
fi

pack() {
  tar -czf "$OUTDIR/gpu_suite.tar.gz" -C "$OUTDIR" suite && rm -rf "$OUT"
}
CHILD=
trap pack EXIT
trap 'echo "interrupted" >> "$OUT/suite.log"; [[ -n "$CHILD" ]] && kill -TERM "$CHILD" 2>/dev/null && wait "$CHILD"; exit 143' \
  TERM INT HUP

start=$(date +%s)
failures=0
printf '%s' "$plan" > "$OUT/plan.txt"
echo "step,budget_s,wall_s,rc" > "$OUT/steps.csv"
# run_step NAME LOG CMD...: the command under its scaled timeout, output to LOG, one row in steps.csv
run_step() {
  local name="$1" log="$2" t0 rc base
  shift 2
  for s in "${STEPS[@]}"; do [[ "${s%%|*}" == "$name" ]] && base=$(cut -d'|' -f2 <<< "$s"); done
  local t
  t=$(budget_of "$base")
  echo "=== $name (timeout $t s, at $(( $(date +%s) - start )) s) ===" | tee -a "$OUT/suite.log"
  t0=$(date +%s)
  timeout "$t" "$@" > "$OUT/$log" 2>&1 &
  CHILD=$!
  wait "$CHILD"  # in the background + wait: a TERM to this script is handled now, not when the step ends
  rc=$?
  CHILD=
  echo "$name,$t,$(( $(date +%s) - t0 )),$rc" >> "$OUT/steps.csv"
  if (( rc != 0 )); then
    echo "$name: rc $rc (124 = timed out; see $log)" | tee -a "$OUT/suite.log"
    failures=$((failures + 1))
  fi
  return 0
}
PYTEST=("$PY" -m pytest -v -rfEs --durations=20 -p no:cacheprovider)

run_step env env.txt bash -c "nvidia-smi; date -u; $PY -c 'import peft; print(\"peft\", peft.__version__)'; \
  $PY -m peft_kernels.cli info"
# build, then `info` again: it now names the loaded extension
PEFT_KERNELS_CUDA_ARCHS="90" MAX_JOBS="${MAX_JOBS:-16}" run_step build build.log bash -c \
  "$PY setup.py build_ext --inplace && $PY -m peft_kernels.cli info"
PEFT_KERNELS_AUTOTUNE=first run_step tests_fast tests_fast.log \
  "${PYTEST[@]}" --junitxml="$OUT/tests_fast.xml" "${FAST_TESTS[@]}"
run_step bench_headline bench_headline.log "$PY" -m peft_kernels.cli bench --device cuda --size quick \
  --ops lora_linear --modes fwd+bwd,fwd,bwd --providers peft,triton --no-progress --out "$OUT/bench_headline.csv" --plot ''
deselect=()
for t in "${FAST_TESTS[@]}"; do deselect+=(--deselect "$t"); done
PEFT_KERNELS_AUTOTUNE=first run_step tests_rest tests_rest.log \
  "${PYTEST[@]}" -m gpu --junitxml="$OUT/tests_rest.xml" "${deselect[@]}" "${REST_FILES[@]}"
# QLoRA (issue #14's GPU targets): fwd+bwd >= 1.15x and decode >= 2x PEFT+bnb, decode >= 70% of HBM bandwidth on the
# packed weight bytes (the rows' GB/s; docs/GPU_READINESS.md has the estimates); the e2e step's peak shows whether an
# N x K temporary exists.
run_step bench_qlora bench_qlora.log bash -c "$PY -m peft_kernels.bench.qlora --out '$OUT/bench_qlora_decode.csv' \
  && $PY -m peft_kernels.cli bench --device cuda --size quick --ops lora_linear_4bit --providers peft,triton \
  --no-progress --out '$OUT/bench_qlora.csv' --plot ''"
run_step e2e_qlora bench_e2e_qlora.log "$PY" benchmarks/bench_e2e.py --device cuda --methods qlora --steps 3 \
  --decode-reps 2 --decode-tokens 16 --out "$OUT/bench_e2e_qlora.csv"
run_step bench_ops bench_ops.log bash -c "$PY -m peft_kernels.cli bench --device cuda --size quick \
  --ops lora_linear_int8,prefix_kv --providers peft,reference,triton,cuda --no-progress --out '$OUT/bench_ops.csv' \
  --plot '' && $PY -m peft_kernels.cli bench --device cuda --size quick --ops lora_linear --modes no-grad-fwd \
  --providers peft,reference,triton,cuda --no-progress --out '$OUT/bench_ops.csv' --plot '$OUT/bench_ops.png'"
run_step bench_prefix bench_prefix.log "$PY" benchmarks/bench_prefix.py --gpu --reps 3 --out "$OUT/bench_prefix.csv"
run_step bench_int8 bench_lora_int8.log "$PY" benchmarks/bench_lora_int8.py --quick --modes decode \
  --out "$OUT/bench_lora_int8.csv"
run_step bench_mixed bench_mixed.log bash -c "$PY -m peft_kernels.cli bench --device cuda --size quick \
  --ops lora_linear_mixed --providers peft,reference,triton --no-progress --out '$OUT/bench_mixed_ops.csv' --plot '' \
  && $PY benchmarks/bench_mixed_serving.py --device cuda --reps 3 --out '$OUT/bench_mixed_serving.csv'"
echo "=== done with $failures failure(s) in $(( $(date +%s) - start )) s ===" | tee -a "$OUT/suite.log"
exit "$failures"
