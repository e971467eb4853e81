#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer (CPU kernels) and runs
# the tests that reach compiled code against that build. Usage: .ci/sanitize.sh [pytest args].
# Needs the active Python environment to have torch, pybind11 and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/sanitize
stage=$build/stage
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSIMPLENET_FAST_CUDA=OFF \
  -DSIMPLENET_FAST_SANITIZE=ON -DPython_EXECUTABLE="$(command -v python)" \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" >/dev/null
cmake --build "$build" -j "$(nproc)" >/dev/null
rm -rf "$stage" && mkdir -p "$stage"
cp -r simplenet_fast "$stage/" && cp "$build"/_C*.so "$stage/simplenet_fast/"
# Python itself is not instrumented: preload the runtimes; leak checking would report the
# interpreter's own arenas, so it is off (ASan still catches out-of-bounds and use-after-free).
export LD_PRELOAD="$(g++ -print-file-name=libasan.so):$(g++ -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$PWD/$stage${PYTHONPATH:+:$PYTHONPATH}"
# From another directory: `python -c` puts the current directory first on sys.path, and the
# source tree's simplenet_fast (no _C) would shadow the staged, sanitized one.
(cd / && python -c "import simplenet_fast, sys; info = simplenet_fast.build_info(); \
print(simplenet_fast.__file__, info); sys.exit(0 if info.get('sanitizers') else 1)")
# The last result is kept in .ci/sanitize.last (date, commit, arguments, pytest's summary line).
log=$build/pytest.log
status=0
pytest -q -p no:cacheprovider "${@:-tests/test_fused.py}" 2>&1 | tee "$log" || status=$?
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (working tree modified)')"
  echo "command: .ci/sanitize.sh ${*:-tests/test_fused.py}"
  echo "python: $(python -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')"
  echo "build_info: $(cd / && python -c 'import simplenet_fast; print(simplenet_fast.build_info())')"
  echo "SIMPLENET_FAST_CPU_ISA: ${SIMPLENET_FAST_CPU_ISA:-(unset: widest the CPU has)}"
  echo "exit status: $status"
  echo "result: $(grep -E '(passed|failed|error)' "$log" | tail -1)"
  grep -E '^==[0-9]+==|SUMMARY: (Address|UndefinedBehavior)Sanitizer|runtime error:' "$log" | head -20 || true
} > .ci/sanitize.last
cat .ci/sanitize.last
exit "$status"
