#!/usr/bin/env bash
# Prepares .comfyui/ (git-ignored) for a machine with no network, such as the GPU machine:
# the ComfyUI snapshot that tests/python/test_comfyui.py and `kiln bench comfyui` drive, and the
# wheels of the packages ComfyUI's imports need beyond that machine's own (it has torch,
# torchvision, torchaudio, transformers, safetensors, numpy, scipy, pyyaml, Pillow, psutil and
# tqdm): einops, torchsde and trampoline (pure Python) and av (PyAV, 35 MB), for CPython 3.12 on
# x86-64 Linux. Run it where pip reaches PyPI, then carry .comfyui (about 40 MB) along with the
# tree; scripts/gpu_check.sh installs the wheels into a scratch folder and uses the snapshot.
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
mkdir -p "$dest/wheels"
cp "$snapshot" "$dest/"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dest/wheels" \
  einops==0.8.2 torchsde==0.2.6 trampoline==0.1.2 av==19.0.2
du -sh "$dest"
ls "$dest" "$dest/wheels"
