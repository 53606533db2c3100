#!/usr/bin/env bash
# The whole GPU check in ONE device call (issue: build, verify and tune the CUDA kernels).
#   build with DVGS_FAST_CUDA=ON for sm_90 -> full test-suite (CUDA tests included)
#   -> compute-sanitizer memcheck on the kernel tests -> ceilings (copy bandwidth, matmul rate)
#   -> each kernel against its floor -> GPU benchmarks (pytest-benchmark JSON) -> summary table.
# Logs land in $OUT (the device tool brings them back). Usage from the repo root, on the device:
#   bash bench/gpu/run_gpu_check.sh            (OUT defaults to ./gpu_out)
# Needs: torch with CUDA, nvcc of the same major version, cmake, ninja, scikit-build-core, pytest,
# pytest-benchmark. geomloss (pure Python) is installed from .whl/ when carried there.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3
log() { echo "[gpu-check $(date +%T)] $*" | tee -a "$OUT/summary.txt"; }

{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; nvcc --version; } \
  > "$OUT/device.txt" 2>&1
log "device: $($PY -c 'import torch; print(torch.cuda.get_device_name())')"

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

log "build (DVGS_FAST_CUDA=ON, TORCH_CUDA_ARCH_LIST=9.0)"
DVGS_FAST_CUDA=ON TORCH_CUDA_ARCH_LIST="9.0" $PY -m pip install --no-build-isolation --no-deps -e . -v \
  > "$OUT/build.log" 2>&1 || { log "BUILD FAILED (see build.log)"; tail -40 "$OUT/build.log"; exit 1; }
$PY -c "import dvgs_fast, json; print(json.dumps(dvgs_fast.build_info()))" | tee -a "$OUT/summary.txt"

log "test-suite"
$PY -m pytest python_tests -q -x -p no:cacheprovider > "$OUT/tests.log" 2>&1
log "tests: $(tail -1 "$OUT/tests.log")"

log "compute-sanitizer memcheck on the CUDA kernel tests"
compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -p no:cacheprovider -m cuda \
  python_tests/test_ops_grad_stats.py python_tests/test_ops_linear_ghost.py python_tests/test_sinkhorn.py \
  > "$OUT/memcheck.log" 2>&1
log "memcheck exit $? : $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1)"

log "roofline: ceilings and kernels against their floors"
$PY bench/gpu/roofline.py --json "$OUT/roofline.json" 2>&1 | tee "$OUT/roofline.txt"

log "GPU benchmarks"
$PY -m pytest bench -q -m "not slow" -k "cuda or gpu" --benchmark-json="$OUT/bench_gpu.json" \
  > "$OUT/bench.log" 2>&1
log "bench: $(tail -1 "$OUT/bench.log")"
cat "$OUT/summary.txt"
