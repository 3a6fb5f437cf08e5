#!/usr/bin/env bash
# The GPU check, run on a machine with a CUDA GPU from a clean tree: build, every test (the GPU
# ones included), compute-sanitizer memcheck and racecheck on the GPU tests, the Python tests and
# the benchmark suites; with more than one GPU also the multi-GPU stage (NCCL tests of
# kiln.diffusers under diffusers' context parallelism, `kiln bench flux2 --gpus N`). Logs, JSON
# and charts go to $OUT (default ./out).
#
#   scripts/gpu_check.sh                  # every stage
#   scripts/gpu_check.sh tests bench      # some stages: build tests sanitize python bench multigpu
#
# Uses the machine's python3 (with torch) and needs no network. GoogleTest comes from the system,
# or from a source tree in .gtest/ (copy /usr/src/googletest there on a machine that has it);
# Python peers the machine lacks can be unpacked into .peers/, and wheels (diffusers, torchao:
# scripts/fetch_bench_wheels.sh) put into .whl/ are installed into a scratch folder on
# PYTHONPATH (all three folders are git-ignored).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/out}
mkdir -p "$out"
log="$out/gpu_check.log"
stages=${*:-build tests sanitize python bench multigpu}
export KILN_CACHE_DIR=${KILN_CACHE_DIR:-/tmp/kiln-gpu-check-cache}
# NVLink multicast off in NCCL, PyTorch and NVSHMEM, for every process started from here: a
# program using it can take a shared multi-GPU host's GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l)
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

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$scratch/wheels" .whl/*.whl >>"$log" 2>&1 &&
    export PYTHONPATH="$scratch/wheels${PYTHONPATH:+:$PYTHONPATH}" ||
    echo "installing .whl/ failed (log: $log)"
fi

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

if want build; then
  gtest_args=()
  [ -d .gtest ] && gtest_args=(-DKILN_GTEST_SOURCE_DIR="$root/.gtest")
  run configure cmake -S . -B "$build" -G Ninja -DKILN_WERROR=ON "${gtest_args[@]}"
  run build cmake --build "$build" -j "$(nproc)"
fi
if want tests; then
  run cpp_tests sharded_tests
fi
if want sanitize; then
  run sanitizers sanitizers
fi
if want python || { want multigpu && ((gpus > 1)); }; then
  run py_install python3 -m pip install -q --no-build-isolation --no-deps --no-index \
    --config-settings=build-dir=build/gpu-python .
fi
if want python; then
  py_filter=()
  # The multigpu stage runs the NCCL tests (with one GPU they report skipped here).
  want multigpu && ((gpus > 1)) && py_filter=(-k "not nccl")
  run pytest python3 -m pytest tests/python -q -rs "${py_filter[@]}"
fi
if want bench; then
  run bench python3 -m kiln.bench
fi
if want multigpu; then
  if ((gpus > 1)); then
    run pytest_nccl python3 -m pytest tests/python/test_diffusers_parallel.py -q -rs -s -k nccl
    run bench_gpus python3 -m kiln.bench flux2 --gpus "$gpus" --json "$out/bench_flux2_gpus.json"
  else
    summary+=("$(printf '%-12s skipped (%d GPU: needs 2 or more)' multigpu "$gpus")")
  fi
fi

echo
echo "GPU check on $gpus x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1):"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]} (log: $log)"
  exit 1
fi
echo "all stages passed (log: $log)"
