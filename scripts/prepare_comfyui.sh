#!/usr/bin/env bash
# Prepares a machine with no network, such as the GPU machine, for ComfyUI: the snapshot that
# tests/python/test_comfyui.py and `kiln bench comfyui` drive goes into .comfyui/, and the wheels
# of the packages ComfyUI's imports need beyond that machine's own (it has torch, torchvision,
# torchaudio, transformers, safetensors, numpy, scipy, pyyaml, Pillow, psutil and tqdm): einops,
# torchsde and trampoline (pure Python) and av (PyAV, 35 MB), for CPython 3.12 on x86-64 Linux,
# into .whl/, where scripts/fetch_bench_wheels.sh puts the others (both folders git-ignored).
# Run it where pip reaches PyPI, then carry .comfyui and .whl along with the tree;
# scripts/gpu_check.sh installs .whl's wheels into a scratch folder and uses the snapshot.
#
#   scripts/prepare_comfyui.sh [SNAPSHOT]   # default: $KILN_COMFYUI, else
#                                           # ../shared/clients/ComfyUI-a125cd84.tar.gz
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
snapshot=${1:-${KILN_COMFYUI:-$root/../shared/clients/ComfyUI-a125cd84.tar.gz}}
python=${PYTHON:-python3}
if [ ! -f "$snapshot" ]; then
  echo "prepare_comfyui: no ComfyUI snapshot at $snapshot (give its path)" >&2
  exit 1
fi
dest="$root/.comfyui"
rm -rf "$dest"
mkdir -p "$dest" "$root/.whl"
cp "$snapshot" "$dest/"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$root/.whl" \
  einops==0.8.2 torchsde==0.2.6 trampoline==0.1.2 av==19.0.2
du -sh "$dest" "$root/.whl"
ls "$dest" "$root/.whl"
