#!/usr/bin/env bash
# One device run (the `device` tool's H100/H200): environment, CUDA build, GPU tests and the
# benchmark table, every log under $OUT. Meant to fit in about 9 minutes:
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

start=$SECONDS
{ cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DI2AM_LIB_DIR=$PWD/build \
  && cmake --build build -j 16; } > "$OUT/cuda_build.log" 2>&1
echo "cuda build rc=$? in $((SECONDS - start)) s" >> "$OUT/env.txt"
export I2AM_CUDA_LIB=$(ls "$PWD"/build/libi2am_cuda.so 2>/dev/null)

timeout 240 $PY -m pytest -q -p no:cacheprovider -x \
    tests/test_triton_gpu.py tests/test_triton.py tests/test_cuda.py tests/test_api.py \
    > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?" >> "$OUT/env.txt"

timeout 300 $PY -m i2am.cli bench --json "$OUT/bench.json" --plot "$OUT/bench.png" \
    > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/env.txt"
cat "$OUT/env.txt"
tail -5 "$OUT/gpu_tests.log"
tail -70 "$OUT/bench.log"
