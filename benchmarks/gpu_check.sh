#!/usr/bin/env bash
# GPU check of issue #4, in one run on a machine with an NVIDIA GPU (H100/H200: sm_90):
#   1. record the environment (GPU, driver, CUDA, torch, Triton, git commit),
#   2. build the CUDA extension (TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .),
#   3. run the tests on CUDA tensors for the compiled CUDA ("cpp") and Triton backends
#      (tests/test_cuda.py, tests/test_triton.py on the GPU), then the whole suite,
#   4. run the benchmarks (benchmarks/bench_*.py, with --device cuda where they take it) and
#      benchmarks/gpu_bandwidth.py (the issue's targets: fraction of copy bandwidth, kornia,
#      tps_solve, peak memory).
# Everything goes to benchmarks/results/gpu/<UTC time>_<commit>/; a failing step is recorded in
# status.txt and the run goes on. Exit status: 0 when every step passed, 1 otherwise.
#
#   bash benchmarks/gpu_check.sh            # full run
#   QUICK=1 bash benchmarks/gpu_check.sh    # small benchmark shapes
#   PYTHON=/path/to/python SKIP_BUILD=1 ...  # use an existing build
#   STEP_TIMEOUT=seconds                    # per step (default 5400); rc 124 means it timed out
#   TIMEOUT_<step>=seconds                  # for one step, e.g. TIMEOUT_build=240
#   BUILD_INPLACE=1                         # python setup.py build_ext --inplace instead of pip -e
#   WORKERS=8                               # run the GPU tests with pytest-xdist on 8 workers
#   GPU_ONLY=1                              # skip the CPU suite and the CPU-only benchmarks
#   TRITON_TESTS=0                          # skip the Triton kernel tests on the GPU (tests/test_cuda.py
#                                           # still runs both backends)
#   ARCHIVE=path.tgz                        # after every step, pack the results folder there (the archive
#                                           # itself is left out when it lies inside that folder)
#   BENCHES="masked_kl_div warped_kl_div"   # only these benchmarks/bench_<name>.py (default: all)
#   KL_AB=1                                 # rerun the KL benchmarks with TPSWARP_CUDA_KL_REGS=0 (generic path)
#   MEMORY_ARGS="--model rn34"              # arguments of benchmarks/memory_consistency.py --device cuda
#   MEMORY=0                                # skip benchmarks/memory_consistency.py
#   BASELINE=<git revision>                 # A/B of the Triton kernels (pure Python, no build): after the
#                                           # full bandwidth run, the Triton rows of BASELINE's package
#                                           # (a git worktree on PYTHONPATH), then this checkout's again:
#                                           # ab_baseline.csv between bandwidth.csv and ab_again.csv
#   BASELINE_SRC=dir                        # the same from a directory holding the baseline's tpswarp/
#                                           # (no git needed there), e.g. made beforehand with
#                                           # mkdir -p .baseline && git archive REV tpswarp | tar x -C .baseline;
#                                           # with its setup.py and csrc/ too (git archive REV setup.py csrc
#                                           # tpswarp) the baseline's extension is built in place alongside
#                                           # this one's (half the jobs each) and the A/B covers the CUDA
#                                           # kernels as well
#   AB_BACKENDS=cpp                         # the backends of the A/B rows (default: triton, or cpp,triton
#                                           # when the baseline has its own build)
#   NCU=1                                   # Nsight Compute report of the CUDA kernels of every streaming op
#                                           # (benchmarks/profile_ops.py): CSV in ncu.log, a table of it
#                                           # in ncu_summary.md (benchmarks/ncu_summary.py)
set -uo pipefail
set -x

cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python}
COMMIT=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
OUT=${OUT:-$ROOT/benchmarks/results/gpu/$(date -u +%Y%m%dT%H%M%SZ)_${COMMIT}}
mkdir -p "$OUT"
STATUS=$OUT/status.txt
: > "$STATUS"
FAILED=0
QUICK_FLAG=""
[ "${QUICK:-0}" = "1" ] && QUICK_FLAG="--quick"

# step NAME CMD...: run CMD with output in $OUT/NAME.log, record its exit status, never abort.
step() {
  local name=$1
  shift
  local t0=$SECONDS
  echo "=== $name: $*"
  local limit_var="TIMEOUT_$name"
  timeout "${!limit_var:-${STEP_TIMEOUT:-5400}}" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$STATUS"
  tail -n 25 "$OUT/$name.log"
  if [ "$rc" -ne 0 ]; then FAILED=1; fi
  cp benchmarks/results/*.csv "$OUT/" 2>/dev/null || true
  if [ -n "${ARCHIVE:-}" ]; then tar czf "$ARCHIVE" --exclude="$(basename "$ARCHIVE")" -C "$(dirname "$OUT")" "$(basename "$OUT")"; fi
  return 0
}

# ---------------------------------------------------------------------------------- environment
{
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  echo "git_commit: ${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  echo "git_status:"
  git status --short 2>/dev/null | sed 's/^/  /'
  echo "nvidia-smi:"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,clocks.max.mem \
    --format=csv 2>&1 | sed 's/^/  /'
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo 'not found')"
  echo "python: $($PYTHON --version 2>&1)"
} > "$OUT/environment.txt" 2>&1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$STATUS"
$PYTHON - > "$OUT/versions.json" 2>&1 <<'PY'
import json, platform
info = {"python": platform.python_version()}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                capability=torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None)
except Exception as e:
    info["torch_error"] = repr(e)
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:
    info["triton_error"] = repr(e)
try:
    import kornia
    info["kornia"] = kornia.__version__
except Exception:
    info["kornia"] = None
print(json.dumps(info, indent=1))
PY
cat "$OUT/environment.txt" "$OUT/versions.json"

# ---------------------------------------------------------------------------------- build
BASE_BUILD=0
if [ -n "${BASELINE_SRC:-}" ] && [ -f "$BASELINE_SRC/setup.py" ] && [ "${SKIP_BUILD:-0}" != "1" ]; then BASE_BUILD=1; fi
if [ "${SKIP_BUILD:-0}" != "1" ]; then
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  export TPSWARP_FORCE_CUDA=1
  if [ "$BASE_BUILD" = "1" ]; then
    # the baseline's extension, in place in its own directory, while this checkout's builds
    (cd "$BASELINE_SRC" && MAX_JOBS=$(( (MAX_JOBS + 1) / 2 )) $PYTHON setup.py build_ext --inplace) \
      > "$OUT/build_baseline.log" 2>&1 &
    BASE_PID=$!
    export MAX_JOBS=$(( (MAX_JOBS + 1) / 2 ))
  fi
  if [ "${BUILD_INPLACE:-0}" = "1" ]; then
    step build $PYTHON setup.py build_ext --inplace
  else
    step build $PYTHON -m pip install -v --no-build-isolation -e .
  fi
  if [ "$BASE_BUILD" = "1" ]; then
    wait "$BASE_PID"
    echo "build_baseline rc=$?" | tee -a "$STATUS"
    tail -n 5 "$OUT/build_baseline.log"
  fi
fi
step backends $PYTHON -c "import json, tpswarp; print(json.dumps(tpswarp.backends(), indent=1))"

# ---------------------------------------------------------------------------------- tests
# CUDA tensors, both backends, every op (skips only what a backend does not provide).
XDIST=()
[ -n "${WORKERS:-}" ] && XDIST=(-n "$WORKERS")
step test_cuda $PYTHON -m pytest -q -rs "${XDIST[@]}" tests/test_cuda.py --junitxml="$OUT/test_cuda.xml"
# The Triton kernel tests on CUDA tensors (no interpreter); TRITON_TESTS=0 skips them.
[ "${TRITON_TESTS:-1}" = "0" ] || step test_triton_gpu env -u TRITON_INTERPRET $PYTHON -m pytest -q -rs "${XDIST[@]}" \
  tests/test_triton.py tests/test_triton_kl_size.py \
  --junitxml="$OUT/test_triton_gpu.xml"
# The whole suite with the GPU build (CPU tests: reference and C++ backends; CUDA tests again).
if [ "${GPU_ONLY:-0}" != "1" ]; then
  step test_all $PYTHON -m pytest -q -rs tests --junitxml="$OUT/test_all.xml"
  # The CI selection under the interpreter, for comparison with the CPU-only CI.
  step test_triton_interpret env TRITON_INTERPRET=1 TPSWARP_TEST_BACKENDS=triton $PYTHON -m pytest -q tests -m triton
fi

# ---------------------------------------------------------------------------------- benchmarks
for bench in benchmarks/bench_*.py; do
  [ -e "$bench" ] || continue
  name=$(basename "$bench" .py)
  if [ -n "${BENCHES:-}" ] && ! grep -qw "${name#bench_}" <<< "$BENCHES"; then continue; fi
  help=$($PYTHON "$bench" --help 2>&1)
  args=()
  if grep -q -- "--device" <<< "$help"; then
    args+=(--device cuda)
  else
    echo "$name: no --device option, runs on the CPU" >> "$STATUS"
    [ "${GPU_ONLY:-0}" = "1" ] && continue
  fi
  if [ -n "$QUICK_FLAG" ] && grep -q -- "--quick" <<< "$help"; then args+=(--quick); fi
  step "$name" $PYTHON "$bench" "${args[@]}"
  if [ "${KL_AB:-0}" = "1" ] && [[ "$name" == *kl_div ]]; then
    step "${name}_generic" env TPSWARP_CUDA_KL_REGS=0 $PYTHON "$bench" "${args[@]}" --no-save
  fi
  # the opt-in student gradient in warped_kl_div's CUDA forward (compare its "full" rows with the run above)
  if [ "$name" = "bench_warped_kl_div" ]; then
    step "${name}_grad_in_forward" env TPSWARP_CUDA_GRAD_IN_FORWARD=1 $PYTHON "$bench" "${args[@]}" --no-save
  fi
done
step gpu_bandwidth $PYTHON benchmarks/gpu_bandwidth.py --device cuda $QUICK_FLAG --out "$OUT"
# baseline_ab DIR: the A/B rows (AB_BACKENDS) of the tpswarp package in DIR (this script's gpu_bandwidth.py;
# without a build there, Triton serves CUDA), then this checkout's again.
baseline_ab() {
  local backends=${AB_BACKENDS:-triton}
  if [ -z "${AB_BACKENDS:-}" ] && ls "$1"/tpswarp/_C*.so > /dev/null 2>&1; then backends=cpp,triton; fi
  step ab_baseline env PYTHONPATH="$1" $PYTHON benchmarks/gpu_bandwidth.py --device cuda $QUICK_FLAG \
    --backends "$backends" --streaming-only --out "$OUT" --name ab_baseline
  step ab_again $PYTHON benchmarks/gpu_bandwidth.py --device cuda $QUICK_FLAG --backends "$backends" --streaming-only \
    --out "$OUT" --name ab_again
}
if [ -n "${BASELINE_SRC:-}" ]; then
  baseline_ab "$(cd "$BASELINE_SRC" && pwd)"
elif [ -n "${BASELINE:-}" ]; then
  BASE_SRC=$(mktemp -d /tmp/tpswarp-baseline.XXXXXX)
  if git worktree add --detach "$BASE_SRC" "$BASELINE" > "$OUT/baseline_worktree.log" 2>&1; then
    baseline_ab "$BASE_SRC"
    git worktree remove --force "$BASE_SRC" >> "$OUT/baseline_worktree.log" 2>&1
  else
    echo "baseline worktree of $BASELINE failed (baseline_worktree.log)" | tee -a "$STATUS"
    FAILED=1
  fi
fi
if [ "${NCU:-0}" = "1" ]; then
  NCU_BIN=${NCU_BIN:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | tail -n 1)}
  step ncu "${NCU_BIN:-ncu}" --clock-control none --kernel-name-base demangled -k regex:tpswarp --csv --page details \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats \
    $PYTHON benchmarks/profile_ops.py --backend cpp --warmup 0
  $PYTHON benchmarks/ncu_summary.py "$OUT/ncu.log" --out "$OUT/ncu_summary.md" && cat "$OUT/ncu_summary.md"
fi
# One iteration of Algorithm 1, CUDA allocator and the CPU tracker (issue #5).
# shellcheck disable=SC2086
[ "${MEMORY:-1}" = "0" ] \
  || step memory_consistency $PYTHON benchmarks/memory_consistency.py --device cuda ${MEMORY_ARGS:-} --out "$OUT"
# The benchmarks append their CSV rows to benchmarks/results/*.csv; keep a copy with this run.
cp benchmarks/results/*.csv "$OUT/" 2>/dev/null || true

echo "=== summary (results in $OUT)"
cat "$STATUS"
exit $FAILED
