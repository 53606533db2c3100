#!/usr/bin/env bash
# The whole GPU check in ONE device call (issue: build, verify and tune the CUDA kernels).
#   build with DVGS_FAST_CUDA=ON for sm_90 -> full test-suite (CUDA tests included)
#   -> compute-sanitizer memcheck on the kernel tests -> ceilings (copy bandwidth, matmul rate)
#   -> each kernel against its floor -> GPU benchmarks (pytest-benchmark JSON) -> summary table.
#
# Usage, from the repo root:
#   bash bench/gpu/run_gpu_check.sh --fetch-wheels  # where the registry is reachable: wheels the
#                                                   # device lacks -> .whl/ (cached in ~/.cache)
#   bash bench/gpu/run_gpu_check.sh                 # on the device, with .whl carried; logs in $OUT
#   bash bench/gpu/run_gpu_check.sh --dry-run       # without a GPU (CI): runs every step that needs
#                                                   # none, lists the others with their commands
# The device (no registry there) lacks geomloss (pure Python, for the Sinkhorn tests) and may lack
# compute-sanitizer: both travel as wheels in .whl/ (nvidia-cuda-sanitizer-api 13.0.85 is CUDA
# 13.0's compute-sanitizer). Needs there: torch with CUDA, nvcc of the same major version, cmake,
# ninja, scikit-build-core, pytest, pytest-benchmark.
# Knobs: OUT, PYTHON (default python3), GPU_CHECK_ARCHS (default 9.0), GPU_CHECK_BUILD_DIR.
set -uo pipefail
MODE=run
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --fetch-wheels) MODE=fetch ;;
  *) echo "usage: $0 [--dry-run | --fetch-wheels]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/../.."
ROOT="$PWD"
if [ "$MODE" = dry ]; then OUT="${OUT:-$ROOT/build/gpu-dry-run}"; else OUT="${OUT:-$ROOT/gpu_out}"; fi
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
ARCHS="${GPU_CHECK_ARCHS:-9.0}"
DEFAULT_BUILD_DIR='build/gpu-{wheel_tag}'  # scikit-build-core fills in the tag
BUILD_DIR="${GPU_CHECK_BUILD_DIR:-$DEFAULT_BUILD_DIR}"
SANITIZER_SPEC="nvidia-cuda-sanitizer-api==13.0.85"
GEOMLOSS_SPEC="geomloss==0.3.1"
WHEEL_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/dvgs_fast/gpu-wheels"
TOOLS="${TMPDIR:-/tmp}/dvgs-gpu-tools"  # compute-sanitizer from its wheel (kept off PYTHONPATH)
SITE="${TMPDIR:-/tmp}/dvgs-gpu-site"    # geomloss
FAILED=0
log() { echo "[gpu-check $(date +%T)] $*" | tee -a "$OUT/summary.txt"; }
fail() { log "FAILED: $*"; FAILED=1; }
# A step that needs the GPU: gpu_step "COMMAND AS SHOWN" function: runs it, or in a dry run lists it.
gpu_step() {
  local shown="$1"
  shift
  if [ "$MODE" = dry ]; then
    log "needs a GPU, would run: $shown"
    return 0
  fi
  "$@"
}

# ---- wheels for the device (its Python is 3.12, x86-64; both wheels are Python-independent) ----
fetch_wheels() {
  mkdir -p "$WHEEL_CACHE" .whl
  local have_san have_geo
  have_san=$(ls "$WHEEL_CACHE"/nvidia_cuda_sanitizer_api-13.0.85-*.whl 2>/dev/null | head -1)
  have_geo=$(ls "$WHEEL_CACHE"/geomloss-0.3.1-*.whl 2>/dev/null | head -1)
  if [ -z "$have_san" ] || [ -z "$have_geo" ]; then
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_25_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEEL_CACHE" "$SANITIZER_SPEC" "$GEOMLOSS_SPEC" || return 1
  fi
  rm -f .whl/nvidia_cuda_sanitizer_api-*.whl .whl/geomloss-*.whl  # one version of each
  cp "$WHEEL_CACHE"/nvidia_cuda_sanitizer_api-13.0.85-*.whl "$WHEEL_CACHE"/geomloss-0.3.1-*.whl .whl/ || return 1
  log "wheels in .whl/: $(cd .whl && ls | tr '\n' ' ')($(du -sh .whl | cut -f1); carry .whl in the device call)"
}
if [ "$MODE" = fetch ]; then
  fetch_wheels || { log "wheel download failed"; exit 1; }
  exit 0
fi
if [ "$MODE" = dry ] && ! ls .whl/geomloss-*.whl .whl/nvidia_cuda_sanitizer_api-*.whl >/dev/null 2>&1; then
  fetch_wheels || fail "fetching the device's wheels"  # the device cannot: prove they can be had
fi

# ---- 1. the machine ---------------------------------------------------------------------------------
device_name() {
  nvidia-smi > "$OUT/device.txt" 2>&1
  log "device: $("$PY" -c 'import torch; print(torch.cuda.get_device_name())')"
}
gpu_step "nvidia-smi; torch.cuda.get_device_name()" device_name
{ "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"; nvcc --version; } \
  >> "$OUT/device.txt" 2>&1 || fail "torch or nvcc missing (see device.txt)"
log "python $("$PY" -c 'import sys; print(sys.version.split()[0])'), $(grep -m1 '^torch' "$OUT/device.txt")"

# ---- 2. carried wheels: geomloss onto PYTHONPATH, compute-sanitizer when the device has none ---------
rm -rf "$SITE" "$TOOLS"
if ls .whl/geomloss-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target "$SITE" \
    .whl/geomloss-*.whl && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" || fail "installing geomloss"
fi
"$PY" -c "import geomloss" 2>/dev/null || fail "geomloss is not importable (carry .whl: --fetch-wheels)"
SANITIZER="$(command -v compute-sanitizer || true)"
for cand in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  if [ -z "$SANITIZER" ] && [ -x "$cand" ]; then SANITIZER="$cand"; fi
done
# No compute-sanitizer on the device: the wheel's. The dry run always takes the wheel's, to prove it.
if [ -z "$SANITIZER" ] || [ "$MODE" = dry ]; then
  SANITIZER=""
  if ls .whl/nvidia_cuda_sanitizer_api-*.whl >/dev/null 2>&1 && "$PY" -m pip install -q --disable-pip-version-check \
      --no-index --no-deps --no-compile --target "$TOOLS" .whl/nvidia_cuda_sanitizer_api-*.whl; then
    # The toolkit keeps the binary and its injection libraries in one folder; the wheel splits
    # them into bin/ and lib/. Lay them out as the toolkit does.
    mkdir -p "$TOOLS/compute-sanitizer"
    cp -a "$TOOLS"/nvidia/cu13/bin/. "$TOOLS"/nvidia/cu13/lib/. "$TOOLS/compute-sanitizer/"
    SANITIZER="$TOOLS/compute-sanitizer/compute-sanitizer"
  fi
fi
if [ -n "$SANITIZER" ] && "$SANITIZER" --version > "$OUT/sanitizer.txt" 2>&1; then
  log "compute-sanitizer: $SANITIZER ($(grep -m1 Version "$OUT/sanitizer.txt"))"
else
  fail "no working compute-sanitizer (carry .whl with $SANITIZER_SPEC)"
  SANITIZER=""
fi

# ---- 3. build -------------------------------------------------------------------------------------------
log "build (DVGS_FAST_CUDA=ON, TORCH_CUDA_ARCH_LIST=$ARCHS, build dir $BUILD_DIR)"
if DVGS_FAST_CUDA=ON TORCH_CUDA_ARCH_LIST="$ARCHS" "$PY" -m pip install --disable-pip-version-check \
    --no-build-isolation --no-deps -e . -v --config-settings=build-dir="$BUILD_DIR" > "$OUT/build.log" 2>&1; then
  (cd "$OUT" && "$PY" -c "import dvgs_fast, json; print(json.dumps(dvgs_fast.build_info()))") 2>&1 \
    | tee -a "$OUT/summary.txt"
else
  log "BUILD FAILED (see build.log)"
  tail -40 "$OUT/build.log"
  exit 1
fi

# ---- 4. test-suite ----------------------------------------------------------------------------------
TESTS=("$PY" -m pytest python_tests -q -x -p no:cacheprovider)
"${TESTS[@]}" --collect-only > "$OUT/tests_collect.log" 2>&1 || fail "test-suite collection (see tests_collect.log)"
log "test-suite collects: $(tail -1 "$OUT/tests_collect.log")"
run_tests() {
  "${TESTS[@]}" > "$OUT/tests.log" 2>&1 || fail "test-suite"
  log "tests: $(tail -1 "$OUT/tests.log")"
}
# The dry run leaves the suite to CI, which runs it without a GPU anyway.
gpu_step "$(printf '%q ' "${TESTS[@]}")" run_tests

# ---- 5. compute-sanitizer memcheck on the CUDA kernel tests --------------------------------------------
MEMCHECK=("$PY" -m pytest -q -p no:cacheprovider -m cuda
          python_tests/test_ops_grad_stats.py python_tests/test_ops_linear_ghost.py python_tests/test_sinkhorn.py)
"${MEMCHECK[@]}" --collect-only > "$OUT/memcheck_collect.log" 2>&1 \
  || fail "the memcheck selection collects no CUDA test (see memcheck_collect.log)"
log "memcheck selection: $(tail -1 "$OUT/memcheck_collect.log")"
run_memcheck() {
  [ -n "$SANITIZER" ] || { fail "memcheck: no compute-sanitizer"; return; }
  "$SANITIZER" --tool memcheck --error-exitcode 9 "${MEMCHECK[@]}" > "$OUT/memcheck.log" 2>&1
  local rc=$?
  log "memcheck exit $rc: $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1)"
  [ $rc -eq 0 ] || fail "memcheck"
}
gpu_step "$(printf '%q ' "$SANITIZER" --tool memcheck --error-exitcode 9 "${MEMCHECK[@]}")" run_memcheck

# ---- 6. roofline: ceilings and each kernel against its floor --------------------------------------------
"$PY" bench/gpu/roofline.py --check > "$OUT/roofline_check.txt" 2>&1 || fail "roofline.py --check (see roofline_check.txt)"
run_roofline() {
  "$PY" bench/gpu/roofline.py --json "$OUT/roofline.json" 2>&1 | tee "$OUT/roofline.txt" || fail "roofline"
}
gpu_step "$(printf '%q ' "$PY" bench/gpu/roofline.py --json "$OUT/roofline.json")" run_roofline

# ---- 7. GPU benchmarks ------------------------------------------------------------------------------------
BENCH=("$PY" -m pytest bench -q -p no:cacheprovider -m "not slow" -k "cuda or gpu")
# Without a GPU the CUDA cases are not generated, so the dry collection may find none (exit 5).
"${BENCH[@]}" --collect-only > "$OUT/bench_collect.log" 2>&1
rc=$?
{ [ $rc -eq 0 ] || [ $rc -eq 5 ]; } || fail "benchmark collection (see bench_collect.log)"
run_bench() {
  "${BENCH[@]}" --benchmark-json="$OUT/bench_gpu.json" > "$OUT/bench.log" 2>&1 || fail "benchmarks"
  log "bench: $(tail -1 "$OUT/bench.log")"
}
gpu_step "$(printf '%q ' "${BENCH[@]}" --benchmark-json="$OUT/bench_gpu.json")" run_bench

log "mode $MODE: $([ $FAILED -eq 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED')"
exit $FAILED
