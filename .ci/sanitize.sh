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
python -c "import simplenet_fast, sys; info = simplenet_fast.build_info(); print(info); sys.exit(0 if info['sanitizers'] else 1)"
pytest -q -p no:cacheprovider "${@:-tests/test_fused.py}"
