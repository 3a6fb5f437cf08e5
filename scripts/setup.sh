#!/usr/bin/env bash
# Installs what kiln's build and tests need on a fresh Debian machine: build tools and
# GoogleTest from Debian's packages, and a Python venv (.venv) with numpy, torch, pytest,
# nanobind, scikit-build-core, matplotlib and comfy-kitchen (a test peer) from PyPI. The CUDA
# toolkit (headers, cudart, NVRTC; no GPU needed) must already be installed: set
# CUDAToolkit_ROOT if it is not found.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

need_apt=()
for tool in cmake ninja g++ clang-format; do
  command -v "$tool" >/dev/null || need_apt+=("$tool")
done
[ -f /usr/include/gtest/gtest.h ] || need_apt+=(libgtest-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  pkgs=()
  for p in "${need_apt[@]}"; do
    case $p in ninja) pkgs+=(ninja-build) ;; *) pkgs+=("$p") ;; esac
  done
  echo "setup: installing ${pkgs[*]} from Debian's packages"
  apt-get update -qq && apt-get install -y -qq "${pkgs[@]}"
fi

if [ -z "${CUDAToolkit_ROOT:-}" ] && [ ! -f /usr/local/cuda/include/nvrtc.h ]; then
  echo "setup: no CUDA toolkit at /usr/local/cuda; install it (any 12.x or 13.x) or set" \
       "CUDAToolkit_ROOT" >&2
  exit 1
fi

venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r "$root/scripts/requirements.txt"
