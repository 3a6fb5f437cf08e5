#!/usr/bin/env bash
# The GPU check, run on a machine with a CUDA GPU from a clean tree: build, every test (the GPU
# set, then the rest), compute-sanitizer memcheck and racecheck on the sanitizer subset, the Python
# tests, the benchmark suites, the op cases' timings and the tuning harnesses of dev/ (their short
# default runs); with more than one GPU also the multi-GPU stage (NCCL tests of kiln.diffusers
# under diffusers' context parallelism, `kiln bench flux2 --gpus N`). Logs, JSON and charts go
# to $OUT (default ./out), the harnesses' JSON to $OUT/dev.
#
#   scripts/gpu_check.sh                  # every stage
#   scripts/gpu_check.sh tests bench      # some stages: build tests sanitize python peers bench
#                                         # perf dev multigpu
#
# Uses the machine's python3 (with torch) and needs no network. GoogleTest comes from the system,
# or from a source tree in .gtest/ (copy /usr/src/googletest there on a machine that has it); the
# Python packages the machine lacks come as wheels in .whl/ (scripts/fetch_bench_wheels.sh:
# diffusers, torchao, gguf, the build's nanobind; scripts/prepare_comfyui.sh: ComfyUI's), installed
# into a scratch folder on PYTHONPATH; the ComfyUI snapshot from .comfyui/ (all git-ignored).
#
# llama.cpp, the peer of `kiln bench llm`: the "peers" stage builds its CUDA backend, llama-bench
# and kiln's logits dumper (dev/llm/llama_cpp.sh build cuda, sm_90) when its trimmed source came
# along in .peers/llama.cpp/src (22 MiB: `dev/llm/llama_cpp.sh fetch` makes it on a machine with
# network; carry that folder, not a build). The 8B GGUF models the llm suite times are too large to
# carry (8.5 GiB each): the suite writes them on this machine with kiln.llm.synthetic into
# $KILN_LLM_MODEL_DIR (default: the temp folder; two files, about 17 GiB of disk). Each stage fits
# the 10-minute command limit alone (`scripts/gpu_check.sh peers`, then `bench`), not all of them
# together.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/out}
mkdir -p "$out"
log="$out/gpu_check.log"
stages=${*:-build tests sanitize python peers bench perf dev multigpu}
export KILN_CACHE_DIR=${KILN_CACHE_DIR:-/tmp/kiln-gpu-check-cache}
# NVLink multicast off in NCCL, PyTorch and NVSHMEM, for every process started from here: a
# program using it can take a shared multi-GPU host's GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l)
export PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1  # a crash in an extension prints the Python stack
build=build/gpu
tests="$build/tests/kiln_tests"
# The test binary's registry names the subsets (tests/README.md): --kiln_select=cuda is every op
# case on the CUDA backend and every test that needs a GPU, --kiln_select=sanitize the subset the
# sanitizers run (small cases through every kernel path), --kiln_select=cpu the rest.
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

# A subset of the C++ suite in $shards processes at once (gtest sharding); they share the JIT disk
# cache. Each shard's log is kept in $OUT/tests_<subset>_<i>.log as it runs (a command stopped by
# its time limit still brings them back). sharded_tests SUBSET
sharded_tests() {
  local pids=() status=0
  for ((i = 0; i < shards; i++)); do
    GTEST_TOTAL_SHARDS=$shards GTEST_SHARD_INDEX=$i "$tests" --gtest_brief=1 \
      --kiln_select="$1" >"$out/tests_$1_$i.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  cat "$out/tests_$1"_*.log
  return $status
}

# memcheck and racecheck on the sanitizer subset, at once; beside them the attention cases with
# the sm_90a prefill's persistent grid capped at 3 blocks (KILN_ATTENTION_PREFILL_BLOCKS: every
# block walks many work tiles, which no case does on a full grid), plain and under racecheck.
# Logs: $OUT/memcheck.log, racecheck.log, attention_blocks3.log.
sanitizers() {
  compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check full \
    "$tests" --gtest_brief=1 --kiln_select=sanitize >"$out/memcheck.log" 2>&1 &
  local memcheck=$!
  compute-sanitizer --tool racecheck --error-exitcode 1 \
    "$tests" --gtest_brief=1 --kiln_select=sanitize >"$out/racecheck.log" 2>&1 &
  local racecheck=$! status=0
  (
    export KILN_ATTENTION_PREFILL_BLOCKS=3
    "$tests" --gtest_brief=1 --kiln_select=cuda --gtest_filter='*Attention*' &&
      compute-sanitizer --tool racecheck --error-exitcode 1 "$tests" --gtest_brief=1 \
        --kiln_select=sanitize --gtest_filter='*Attention*'
  ) >"$out/attention_blocks3.log" 2>&1 &
  local blocks3=$!
  wait $memcheck || { echo "memcheck FAILED"; status=1; }
  wait $racecheck || { echo "racecheck FAILED"; status=1; }
  wait $blocks3 || { echo "attention with 3 prefill blocks FAILED"; status=1; }
  echo "== memcheck"; cat "$out/memcheck.log"
  echo "== racecheck"; cat "$out/racecheck.log"
  echo "== attention, KILN_ATTENTION_PREFILL_BLOCKS=3"; cat "$out/attention_blocks3.log"
  return $status
}

# The Python tests that use a GPU (CUDA parametrizations, GPU-only tests); CI runs the rest. The
# model tests (diffusers, ComfyUI, LLM: models of GiBs) run in one process, the op tests beside
# them in several (pytest-xdist, where the machine has it); each test has a time limit
# (pytest-timeout, where present), so that a hang is reported and the stage still ends with its
# failure reports. Logs: $OUT/pytest_models.log, $OUT/pytest_ops.log.
python_gpu_tests() {
  local filter="(cuda or gpu or GPU) and not nccl" models ops=() f parallel=() limit=() status=0
  models=(tests/python/test_diffusers.py tests/python/test_comfyui.py tests/python/test_llm.py)
  for f in tests/python/test_*.py; do [[ " ${models[*]} " == *" $f "* ]] || ops+=("$f"); done
  python3 -c 'import xdist' 2>/dev/null && parallel=(-n 6 --dist loadfile)
  python3 -c 'import pytest_timeout' 2>/dev/null && limit=(--timeout 1200)
  python3 -m pytest "${models[@]}" -q -rfEs "${limit[@]}" -k "$filter" \
    >"$out/pytest_models.log" 2>&1 &
  local models_pid=$!
  python3 -m pytest "${ops[@]}" -q -rfEs "${parallel[@]}" "${limit[@]}" -k "$filter" \
    >"$out/pytest_ops.log" 2>&1 || status=1
  wait $models_pid || status=1
  cat "$out/pytest_models.log" "$out/pytest_ops.log"
  return $status
}

# Every op case on CUDA timed (median after warm-up, L2 flushed): GB/s and TFLOP/s, one line each.
perf_table() { "$tests" --kiln_perf | tee "$out/kiln_perf.txt"; }

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
# The CPU cases are CI's (scripts/test.sh); here only on request (the "cpu" stage).
if want tests; then
  run gpu_tests sharded_tests cuda
fi
if want cpu; then
  run cpu_tests sharded_tests cpu
fi
if want sanitize; then
  run sanitizers sanitizers
fi
if want python || { want multigpu && ((gpus > 1)); }; then
  run py_install py_install
fi
if want python; then
  run pytest python_gpu_tests
fi
if want peers; then
  if [ -d .peers/llama.cpp/src ]; then
    run llama_cpp dev/llm/llama_cpp.sh build cuda
  else
    echo "==== llama_cpp: no .peers/llama.cpp/src carried: kiln bench llm runs without its peer" |
      tee -a "$log"
  fi
fi
if want bench; then
  if [ ! -d .comfyui ]; then
    echo "==== bench: no .comfyui/ here, so kiln bench comfyui measures nothing (run" \
         "scripts/prepare_comfyui.sh where pip reaches PyPI and carry .comfyui)" | tee -a "$log"
  fi
  # One process a suite, each its own line (and time) in the summary; KILN_BENCH_SUITES names a
  # subset ("norm activation matmul"), so that the stage can be split over 10-minute commands.
  all_suites=$(python3 -c 'from kiln.bench import suite_names; print(*suite_names())' 2>/dev/null)
  suites=${KILN_BENCH_SUITES:-$all_suites}
  [ -n "$suites" ] || run bench python3 -c 'import kiln.bench'  # fails, the error in the log
  for suite in $suites; do
    run "bench_$suite" python3 -m kiln.bench "$suite"
  done
fi
if want perf; then
  run perf perf_table
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
  for harness in dev/{rope_flux,attention,conv2d,matmul,flux2}/*.py; do  # not dev/jit's SASS diff
    [ -f "$harness" ] && run "$harness" env OUT="$out/dev" python3 "$harness"
  done
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
