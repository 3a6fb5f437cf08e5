#!/usr/bin/env bash
# llama.cpp as kiln's LLM peer, built from its published source (never linked into kiln, never
# copied into the tree). The source is the copy vendored in the llama-cpp-python sdist on PyPI.
#
#   dev/llm/llama_cpp.sh fetch          # download the sdist (needs network), unpack and trim
#                                       # llama.cpp into .peers/llama.cpp/src (git-ignored)
#   dev/llm/llama_cpp.sh build cpu      # CPU build: kiln's logits dumper (dev/llm/peer/logits.cpp)
#   dev/llm/llama_cpp.sh build cuda     # CUDA build for sm_90: the dumper and llama-bench
#
# Builds go to .peers/llama.cpp/build-{cpu,cuda}; binaries in bin/ there. The GPU machine has no
# network: carry .peers/llama.cpp/src (the trimmed source, 22 MiB) with the working tree and run
# `build cuda` there (scripts/gpu_check.sh's peers stage does when the source is present); the
# gguf package kiln.llm reads files with travels as a wheel (scripts/fetch_bench_wheels.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
peer=$root/.peers/llama.cpp
# llama-cpp-python 0.3.36 vendors llama.cpp at ggml-org/llama.cpp@0c1e57098 (its CHANGELOG).
sdist_version=0.3.36
llama_commit=0c1e57098
python=${PYTHON:-python3}

fetch() {
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  if [ $# -gt 0 ]; then
    cp "$1" "$tmp/"
  else
    "$python" -m pip download --quiet --no-binary :all: --no-deps \
      "llama-cpp-python==$sdist_version" -d "$tmp"
  fi
  tar xzf "$tmp"/llama_cpp_python-"$sdist_version".tar.gz -C "$tmp"
  rm -rf "$peer/src"
  mkdir -p "$peer"
  mv "$tmp/llama_cpp_python-$sdist_version/vendor/llama.cpp" "$peer/src"
  # What the build of libllama, the CPU and CUDA backends and llama-bench does not read.
  (
    cd "$peer/src"
    rm -rf models docs media tests examples pocs benches gguf-py scripts conversion skills \
      requirements requirements.txt convert_*.py app ci .github .devops
    find tools -mindepth 1 -maxdepth 1 ! -name llama-bench -exec rm -rf {} +
    find ggml/src -mindepth 1 -maxdepth 1 -type d -name 'ggml-*' \
      ! -name ggml-cpu ! -name ggml-cuda -exec rm -rf {} +
  )
  echo "llama-cpp-python $sdist_version, llama.cpp $llama_commit" >"$peer/src/KILN_PEER_VERSION"
  du -sh "$peer/src"
}

build() {
  local kind=${1:?build cpu|cuda}
  [ -d "$peer/src" ] || { echo "no llama.cpp source in $peer/src: run '$0 fetch'" >&2; exit 1; }
  local args=(-DLLAMA_SOURCE_DIR="$peer/src" -DCMAKE_BUILD_TYPE=Release)
  local targets=(kiln-llama-logits)
  command -v ccache >/dev/null && args+=(-DCMAKE_C_COMPILER_LAUNCHER=ccache
    -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
  case $kind in
    cpu) args+=(-DGGML_CUDA=OFF) ;;
    cuda)
      args+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES:-90}"
        -DGGML_CUDA_NCCL=OFF -DKILN_LLAMA_BENCH=ON)
      targets+=(llama-bench)
      ;;
    *) echo "build: expected cpu or cuda, got '$kind'" >&2; exit 2 ;;
  esac
  local t0=$SECONDS
  cmake -S "$root/dev/llm/peer" -B "$peer/build-$kind" -G Ninja "${args[@]}"
  cmake --build "$peer/build-$kind" -j "${JOBS:-$(nproc)}" --target "${targets[@]}"
  echo "llama.cpp $kind build: $((SECONDS - t0)) s, binaries in $peer/build-$kind/bin"
}

case ${1:-} in
  fetch) shift; fetch "$@" ;;
  build) shift; build "$@" ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
