#!/usr/bin/env bash
# Installs what kiln's build, tests and benchmarks need on a fresh Debian machine: build tools and
# GoogleTest from Debian's packages, and Python packages from PyPI. The CUDA toolkit (headers,
# cudart, NVRTC; no GPU needed) must already be installed: set CUDAToolkit_ROOT if it is not found.
#
#   scripts/setup.sh          everything in scripts/requirements.txt, torch included (the tests)
#   scripts/setup.sh --run    what the main job needs: without a GPU and without a torch already
#                             at hand, no torch (its PyPI wheels bring ~5 GB of CUDA libraries);
#                             `kiln bench` then runs its numpy smoke test
#
# The Python is $KILN_PYTHON when set (an interpreter whose environment has torch, say: packages
# it lacks are installed into that environment), else .venv, created with access to the system's
# packages when the system python3 has a torch kiln can use, so that torch is not fetched again.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-all}

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

requirements="$root/scripts/requirements.txt"
torch_min=$(sed -n 's/^torch>=\([0-9.]*\).*/\1/p' "$requirements")

torch_ok() {  # torch_ok PYTHON: that interpreter imports a torch >= torch_min
  "$1" - "$torch_min" >/dev/null 2>&1 <<'PY'
import sys
import torch
want = tuple(int(p) for p in sys.argv[1].split("."))
have = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:len(want)])
sys.exit(0 if have >= want else 1)
PY
}

has_gpu() { [ -e /dev/nvidia0 ] || { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; }

if [ -n "${KILN_PYTHON:-}" ]; then
  python=$KILN_PYTHON
  echo "setup: using KILN_PYTHON=$python"
else
  python="$root/.venv/bin/python"
  if [ ! -x "$python" ]; then
    if command -v python3 >/dev/null && torch_ok python3; then
      echo "setup: creating .venv with the system's packages (its torch is >= $torch_min)"
      python3 -m venv --system-site-packages "$root/.venv"
    else
      echo "setup: creating .venv"
      python3 -m venv "$root/.venv"
    fi
    "$python" -m pip install -q --upgrade pip
  fi
fi

wanted=$(mktemp)
trap 'rm -f "$wanted"' EXIT
if [ "$mode" = --run ] && ! has_gpu && ! torch_ok "$python"; then
  echo "setup: no GPU and no torch >= $torch_min here: torch is not installed (the main job" \
       "runs kiln's numpy smoke test); set KILN_PYTHON to a python with torch to use it"
  grep -v -E '^(torch|comfy-kitchen|pytest|hypothesis|matplotlib)\b' "$requirements" >"$wanted"
else
  cp "$requirements" "$wanted"
fi
# Requirements already met (a system torch seen through the venv, say) are not fetched again.
"$python" -m pip install -q -r "$wanted"
