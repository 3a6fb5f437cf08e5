#!/usr/bin/env bash
# kiln's test command: set up, build (warnings are errors), check formatting, run every test:
# the C++ suite through ctest and the Python suite through pytest. GPU tests report "skipped"
# on machines without a CUDA device.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
jobs=$(nproc)

echo "== format"
git ls-files '*.cpp' '*.hpp' '*.cuh' | xargs clang-format --dry-run --Werror

echo "== generated sources"
python3 scripts/gen_wgmma.py --check

echo "== build"
cmake -S . -B build/test -G Ninja -DKILN_WERROR=ON -DCMAKE_BUILD_TYPE=Release -DKILN_BUILD_DEV=ON
cmake --build build/test -j "$jobs"

echo "== C++ tests"
# A scratch JIT cache, so that the tests see neither the user's cache nor a stale one.
KILN_CACHE_DIR=$(mktemp -d) ctest --test-dir build/test -j "$jobs" --output-on-failure

echo "== Python tests"
# The fuzz test (tests/python/test_fuzz.py) runs for KILN_FUZZ_SECONDS (default 40) in all and
# prints its seed.
python=${KILN_PYTHON:-.venv/bin/python}
"$python" -m pip install -q --no-build-isolation "$root"
# The C++ tuning harnesses of dev/ are built above, so that they compile with the library;
# tests/python/test_dev_harnesses.py runs them (each says "no CUDA device" here).
KILN_DEV_BUILD=build/test KILN_CACHE_DIR=$(mktemp -d) "$python" -m pytest tests/python -q -rs
