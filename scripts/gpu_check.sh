#!/usr/bin/env bash
# One device run (the `device` tool's H100/H200): environment, CUDA build, GPU tests, the time
# of each Triton pass and the benchmark table, every log under $OUT. Every step has a cap and the
# whole stays within BUDGET seconds (default 540), most valuable first:
#   run(command="bash scripts/gpu_check.sh", timeout_s=590)
# The device machine has torch and triton but no diffusers and no network, and nothing is
# installed: the source tree is imported in place (i2am.kernels is the top-level kernels/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/i2am-gpu-check}
mkdir -p "$OUT"
[ -e i2am/kernels ] || ln -s ../kernels i2am/kernels  # what setup.py's package_dir does
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  cat COMMIT 2>/dev/null; } > "$OUT/env.txt" 2>&1

DEADLINE=$((SECONDS + ${BUDGET:-540}))
cap() { local left=$((DEADLINE - SECONDS)); echo $(( $1 < left ? $1 : (left > 5 ? left : 5) )); }

start=$SECONDS
{ timeout "$(cap 150)" cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DI2AM_LIB_DIR=$PWD/build \
  && timeout "$(cap 150)" cmake --build build -j 16; } > "$OUT/cuda_build.log" 2>&1
echo "cuda build rc=$? in $((SECONDS - start)) s" >> "$OUT/env.txt"
export I2AM_CUDA_LIB=$(ls "$PWD"/build/libi2am_cuda.so 2>/dev/null)

timeout "$(cap 200)" $PY -m pytest -q -p no:cacheprovider \
    --maxfail=10 tests/test_triton_gpu.py tests/test_triton.py tests/test_cuda.py tests/test_api.py \
    > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?" >> "$OUT/env.txt"

timeout "$(cap 60)" $PY bench/triton_passes.py > "$OUT/triton_passes.md" 2>&1
echo "triton passes rc=$?" >> "$OUT/env.txt"
I2AM_C_FROM_P_RANGE=-1 timeout "$(cap 60)" $PY bench/triton_passes.py > "$OUT/triton_passes_two_exp.md" 2>&1
echo "triton passes, two exponentials rc=$?" >> "$OUT/env.txt"

timeout "$(cap 600)" $PY -m i2am.cli bench --json "$OUT/bench.json" --plot "$OUT/bench.png" \
    > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/env.txt"
cat "$OUT/env.txt"
tail -5 "$OUT/gpu_tests.log"
cat "$OUT/triton_passes.md" "$OUT/triton_passes_two_exp.md"
tail -70 "$OUT/bench.log"
