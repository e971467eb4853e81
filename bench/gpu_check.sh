#!/usr/bin/env bash
# One call on a lent GPU machine (an H200; METHOD.md "Fit the lease"): build the extension with
# CUDA for sm_90 only, run the CUDA tests, time the fused head and the end-to-end pipeline
# (bench/bench_gpu_e2e.py), run compute-sanitizer on small cases. Every step runs even if an
# earlier one failed; each step's time limit comes out of one budget (GPU_CHECK_BUDGET_S, default
# 360 s). Full logs go to $OUT (at most 8 files come back); the last thing printed is a short
# summary.
#
#   bash bench/gpu_check.sh        (from anywhere; the repository root is found from this path)
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUILD=${BUILD_DIR:-/tmp/simplenet_fast_build}
BUDGET=${GPU_CHECK_BUDGET_S:-360}
START=$(date +%s)

elapsed() { echo $(( $(date +%s) - START )); }
# Seconds a step may take: its own cap, or what is left of the budget (less 15 s for the summary).
limit() { local left=$(( BUDGET - $(elapsed) - 15 )); (( left < $1 )) && echo $(( left > 10 ? left : 10 )) || echo "$1"; }
note() { echo "[gpu_check +$(elapsed)s] $*"; }
declare -A STATUS

# ------------------------------------------------------------------------- environment
{
  date
  nvidia-smi || true
  nvcc --version || true
  cmake --version | head -1
  "$PY" -c "import sys, sysconfig, os, torch; inc = sysconfig.get_paths()['include']
print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
print('Python.h', os.path.exists(os.path.join(inc, 'Python.h')), inc)"
  "$PY" -c "import pybind11, pytest; print('pybind11', pybind11.__version__, 'pytest', pytest.__version__)"
} > "$OUT/env.txt" 2>&1
note "environment: $(grep -m1 '^torch' "$OUT/env.txt")"

# ------------------------------------------------------------------------- build (sm_90 only)
# A direct CMake build, its module copied into this (throw-away) copy of the tree: no pip, no
# network. -Xptxas=-v puts registers, shared memory and spills of every kernel in build.log.
note "building _C with CUDA for sm_90 ..."
GENERATOR=()
command -v ninja > /dev/null && GENERATOR=(-G Ninja)
rm -rf "$BUILD"
if timeout "$(limit 240)" bash -c '
    cmake -S "$1" -B "$2" "${@:4}" -DCMAKE_BUILD_TYPE=Release -DSIMPLENET_FAST_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_FLAGS=-Xptxas=-v \
      -Dpybind11_DIR="$("$3" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v "$3")" &&
    cmake --build "$2" -j "$(nproc)"' _ "$ROOT" "$BUILD" "$PY" "${GENERATOR[@]}" > "$OUT/build.log" 2>&1; then
  rm -f simplenet_fast/_C*.so
  cp "$BUILD"/_C*.so simplenet_fast/ && STATUS[build]=OK || STATUS[build]=FAIL
else
  STATUS[build]=FAIL
fi
note "build ${STATUS[build]}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if "$PY" -c "import simplenet_fast as s; i = s.build_info(); print(i); assert i['cuda'], 'built without CUDA'" \
    > /tmp/simplenet_fast_build_info.txt 2>&1; then
  STATUS[import]=OK
else
  STATUS[import]=FAIL
fi
cat /tmp/simplenet_fast_build_info.txt >> "$OUT/build.log"

# ------------------------------------------------------------------------- CUDA tests
# Not -x: with one GPU run per task, every failure is worth seeing, and the other tests still run.
TIMEOUT_OPT=()
"$PY" -c "import pytest_timeout" 2> /dev/null && TIMEOUT_OPT=(--timeout 150)
note "pytest -m cuda ..."
timeout "$(limit 240)" "$PY" -m pytest -q tests -m cuda -p no:cacheprovider --continue-on-collection-errors \
  "${TIMEOUT_OPT[@]}" > "$OUT/tests.log" 2>&1
TESTS_RC=$?
TESTS_LINE=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$OUT/tests.log" | tail -1)
case $TESTS_RC in
  0) STATUS[tests]=OK ;;
  124) STATUS[tests]="TIMEOUT" ;;
  *) STATUS[tests]="FAIL(rc=$TESTS_RC)" ;;
esac
note "tests ${STATUS[tests]}: $TESTS_LINE"

# ------------------------------------------------------------------------- benchmarks
# Each benchmark exits 2 when a timed path disagreed with the reference (CHECK-FAILED).
run_bench() {  # status key, cap seconds, log file, command...
  local key=$1 cap=$2 log=$3
  shift 3
  note "$key ..."
  timeout "$(limit "$cap")" "$@" > "$log" 2>&1
  case $? in
    0) STATUS[$key]=OK ;;
    2) STATUS[$key]="CHECK-FAILED" ;;
    124) STATUS[$key]=TIMEOUT ;;
    *) STATUS[$key]=FAIL ;;
  esac
  note "$key ${STATUS[$key]}"
}
run_bench bench 200 "$OUT/bench.log" "$PY" bench/bench_gpu.py --out "$OUT/bench.json"
# WideResNet-50-2 at 288, batch 1 / 32, float32 / bf16: score() fused and reference, eager and
# CUDA graph, the official-style baseline, the device path alone. Its JSON is the RESULTS_JSON
# line of the log (no extra file: at most 8 come back).
run_bench e2e 150 "$OUT/bench_e2e.log" "$PY" bench/bench_gpu_e2e.py

# ------------------------------------------------------------------------- compute-sanitizer
# Small cases, our kernels only: out-of-bounds (memcheck) and shared-memory races (racecheck)
# that the results may not show. Works on Firecracker machines, not on gVisor (KINDS.md).
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2> /dev/null | head -1)
cat > /tmp/sanitize_cases.py << 'EOF'
# Runs the fused head once per case; inputs made on the CPU so that few torch kernels run.
import sys
import torch
from simplenet_fast import SimpleNetHead, _fused
cases = {  # channels, pretrain, target, hidden, grid2, grid3, batch
    "odd": ((13, 21), 50, 37, 200, (9, 11), (5, 6), 3),       # element-wise weight loads
    "paper1": ((512, 1024), 1536, 1536, 1024, (6, 6), (3, 3), 1),  # BM 128, hidden split in 8
    "wide": ((400, 400), 3600, 3600, 64, (6, 7), (3, 4), 2),    # pooled piece by piece
}
for name in sys.argv[1:]:
    channels, pretrain, target, hidden, grid2, grid3, batch = cases[name]
    head = SimpleNetHead(channels, pretrain, target, hidden).eval().cuda()
    for feature_dtype in (torch.float32, torch.bfloat16):
        f = [torch.randn(batch, channels[0], *grid2).to(feature_dtype).cuda(),
             torch.randn(batch, channels[1], *grid3).to(feature_dtype).cuda()]
        for compute_dtype in (torch.float32, torch.bfloat16):
            scores = _fused.fused_patch_scores(head, f, compute_dtype=compute_dtype)
            torch.cuda.synchronize()
            print(name, feature_dtype, compute_dtype, "finite:", bool(torch.isfinite(scores).all()), flush=True)
EOF
run_sanitizer() {  # tool, cap seconds, cases...
  local tool=$1 cap=$2
  shift 2
  if [[ -z "$SANITIZER" ]]; then STATUS[$tool]="SKIP(no compute-sanitizer)"; return; fi
  if (( $(elapsed) > BUDGET - 60 )); then STATUS[$tool]="SKIP(budget)"; return; fi
  note "compute-sanitizer --tool $tool ..."
  {
    echo "### $tool, our kernels only"
    timeout "$(limit "$cap")" "$SANITIZER" --tool "$tool" --kernel-name kns=simplenet_fast --error-exitcode 9 \
      --print-limit 20 "$PY" /tmp/sanitize_cases.py "$@"
    echo "### exit $?"
  } >> "$OUT/sanitizer.log" 2>&1
  local summary
  summary=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$OUT/sanitizer.log" | tail -1)
  if [[ -z "$summary" ]] && grep -qiE "unrecognized|invalid (option|value)" "$OUT/sanitizer.log"; then
    {
      echo "### $tool, every kernel (the kernel filter was refused)"
      timeout "$(limit "$cap")" "$SANITIZER" --tool "$tool" --error-exitcode 9 --print-limit 20 \
        "$PY" /tmp/sanitize_cases.py "$@"
      echo "### exit $?"
    } >> "$OUT/sanitizer.log" 2>&1
    summary=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$OUT/sanitizer.log" | tail -1)
  fi
  STATUS[$tool]="${summary:-no summary (see sanitizer.log)}"
}
: > "$OUT/sanitizer.log"
run_sanitizer memcheck 120 odd paper1 wide
run_sanitizer racecheck 90 odd paper1

# ------------------------------------------------------------------------- summary
{
  echo
  echo "=================== gpu_check summary ($(elapsed) s; logs in $OUT) ==================="
  grep -m1 -E "H200|H100|NVIDIA" "$OUT/env.txt" | head -1
  for step in build import tests bench e2e memcheck racecheck; do
    printf '%-10s %s\n' "$step" "${STATUS[$step]:-not run}"
  done
  echo "tests: $TESTS_LINE"
  grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | head -25
  echo "--- ptxas (sm_90): registers, stack, spills per kernel"
  "$PY" - "$OUT/build.log" << 'EOF'
import re, sys
name = frame = None
for line in open(sys.argv[1], errors="replace"):
    if m := re.search(r"Compiling entry function '(\S+)'", line):
        name = m.group(1)
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
        frame = m.groups()
    if (m := re.search(r"Used (\d+) registers", line)) and name and frame:
        kernel = re.search(r"(layer3_term|patch_score|sum_partials)_kernel", name)
        tile = re.search(r"(SimtTile|MmaTileILi\d+)", name)
        feature = "bf16" if "nv_bfloat16" in name.split("kernel", 1)[-1] else "f32"
        print(f"{kernel.group(1) if kernel else name[:40]:13s} {tile.group(1) if tile else '':13s} features {feature:4s} "
              f"regs {m.group(1):>3s} stack {frame[0]} spills {frame[1]}/{frame[2]}")
EOF
  grep -iE "error" "$OUT/build.log" | head -5
  echo "--- benchmark"
  sed -n '/^=== fused head vs reference/,$p' "$OUT/bench.log"
  grep -E "Error|error" "$OUT/bench.log" | head -5
  echo "--- end-to-end benchmark"
  sed -n '/^=== end-to-end/,$p' "$OUT/bench_e2e.log"
  grep -E "Error|error" "$OUT/bench_e2e.log" | grep -v "^RESULTS_JSON" | head -5
} | tee "$OUT/summary.txt"
