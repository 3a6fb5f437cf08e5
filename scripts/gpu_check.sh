#!/usr/bin/env bash
# The GPU check, run on a machine with a CUDA GPU from a clean tree: build, every test (the GPU
# ones included), compute-sanitizer memcheck and racecheck on the GPU tests, the Python tests and
# the benchmark suites, the tuning harnesses of dev/ (their short default runs). Logs, JSON and
# charts go to $OUT (default ./out), the harnesses' JSON to $OUT/dev.
#
#   scripts/gpu_check.sh                  # every stage
#   scripts/gpu_check.sh tests bench      # some stages: build tests sanitize python bench dev
#
# Uses the machine's python3 (with torch) and needs no network. GoogleTest comes from the system,
# or from a source tree in .gtest/ (copy /usr/src/googletest there on a machine that has it);
# Python peers the machine lacks can be unpacked into .peers/ (both folders are git-ignored).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/out}
mkdir -p "$out"
log="$out/gpu_check.log"
stages=${*:-build tests sanitize python bench dev}
export KILN_CACHE_DIR=${KILN_CACHE_DIR:-/tmp/kiln-gpu-check-cache}
# Peers the machine lacks (comfy_kitchen, say) can come along as packages in .peers/.
[ -d .peers ] && export PYTHONPATH="$root/.peers${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1  # a crash in an extension prints the Python stack
build=build/gpu
tests="$build/tests/kiln_tests"
gpu_filter='*Cuda*:*Large*:RopeFluxJit*:JitKernel*'
# The sanitizers run each family's small subset (conv2d: Sanitize/, attention: AttentionSanitize,
# matmul GEMM: the cases below 520 rows, which run the same kernels), not the full case tables or
# conv2d's 8 GiB Large test. Negative patterns: one '-', then ':'-separated.
gpu_filter+='-Cases/Conv2d.*:Layouts/Conv2dLarge.*:Cases/Attention.*:Cases/AttentionDecodeCpAsync.*'
gpu_filter+=':*MatmulGemmCudaLarge*:AttentionSplitKvCuda.*'
failed=()
summary=()

run() {  # run NAME COMMAND...: logs the command's output, records pass or fail
  local name=$1
  shift
  local t0=$SECONDS
  echo "==== $name: $*" | tee -a "$log"
  if "$@" >>"$log" 2>&1; then
    summary+=("$(printf '%-12s ok      %4ds' "$name" $((SECONDS - t0)))")
  else
    summary+=("$(printf '%-12s FAILED  %4ds' "$name" $((SECONDS - t0)))")
    failed+=("$name")
    tail -40 "$log"
  fi
}

want() { [[ " $stages " == *" $1 "* ]]; }

shards=${KILN_TEST_SHARDS:-8}
scratch=$(mktemp -d)

# The C++ suite in $shards processes at once (gtest sharding); they share the JIT disk cache.
sharded_tests() {
  local pids=() status=0
  for ((i = 0; i < shards; i++)); do
    GTEST_TOTAL_SHARDS=$shards GTEST_SHARD_INDEX=$i "$tests" --gtest_brief=1 \
      >"$scratch/shard_$i.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  cat "$scratch"/shard_*.log
  return $status
}

# memcheck and racecheck on the GPU subset, at once.
sanitizers() {
  compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check full \
    "$tests" --gtest_brief=1 --gtest_filter="$gpu_filter" >"$scratch/memcheck.log" 2>&1 &
  local memcheck=$!
  compute-sanitizer --tool racecheck --error-exitcode 1 \
    "$tests" --gtest_brief=1 --gtest_filter="$gpu_filter" >"$scratch/racecheck.log" 2>&1 &
  local racecheck=$! status=0
  wait $memcheck || { echo "memcheck FAILED"; status=1; }
  wait $racecheck || { echo "racecheck FAILED"; status=1; }
  echo "== memcheck"; cat "$scratch/memcheck.log"
  echo "== racecheck"; cat "$scratch/racecheck.log"
  return $status
}

{
  date
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  nvcc --version | tail -2
  python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
} >>"$log" 2>&1

gtest_args=()
[ -d .gtest ] && gtest_args=(-DKILN_GTEST_SOURCE_DIR="$root/.gtest")
py_install() {
  python3 -m pip install -q --no-build-isolation --no-deps --no-index \
    --config-settings=build-dir=build/gpu-python .
}

if want build; then
  run configure cmake -S . -B "$build" -G Ninja -DKILN_WERROR=ON "${gtest_args[@]}"
  run build cmake --build "$build" -j "$(nproc)"
fi
if want tests; then
  run cpp_tests sharded_tests
fi
if want sanitize; then
  run sanitizers sanitizers
fi
if want python; then
  run py_install py_install
  run pytest python3 -m pytest tests/python -q -rs
fi
if want bench; then
  run bench python3 -m kiln.bench
fi
if want dev; then
  # Each harness of dev/ (dev/README.md) in its default run, tens of seconds each: the C++ ones
  # built into the same folder with KILN_BUILD_DEV, the Python ones over the installed kiln.
  mkdir -p "$out/dev"
  run dev_config cmake -S . -B "$build" -G Ninja -DKILN_WERROR=ON -DKILN_BUILD_DEV=ON \
    "${gtest_args[@]}"
  run dev_build cmake --build "$build" -j "$(nproc)" --target dev_rope_flux_rows_in_flight \
    dev_conv2d_paths dev_matmul_gemm_tiles
  (cd /tmp && python3 -c 'import kiln') >/dev/null 2>&1 || run py_install py_install
  for harness in "$build"/dev/dev_*; do
    [ -x "$harness" ] && run "$(basename "$harness")" env OUT="$out/dev" "$harness"
  done
  for harness in dev/{rope_flux,attention,conv2d,matmul}/*.py; do  # not dev/jit's SASS diff
    [ -f "$harness" ] && run "$harness" env OUT="$out/dev" python3 "$harness"
  done
fi

echo
echo "GPU check on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1):"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]} (log: $log)"
  exit 1
fi
echo "all stages passed (log: $log)"
