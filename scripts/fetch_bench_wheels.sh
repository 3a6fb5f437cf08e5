#!/usr/bin/env bash
# Puts the wheels that building kiln's Python package, `kiln bench flux2` / `llm` and the tests
# of kiln.diffusers and kiln.llm need beyond what the GPU machine has into the git-ignored .whl/
# folder (scripts/prepare_comfyui.sh adds ComfyUI's), for a machine with no network:
# scripts/gpu_check.sh installs them from there. Run it here, where PyPI can be reached.
#
#   diffusers 0.42.1   the version kiln.diffusers mirrors (kiln.diffusers.DIFFUSERS_VERSION)
#   torchao 0.17.0     the fp8 peer; the release built against torch 2.11, the GPU machine's
#   importlib_metadata diffusers' one requirement the machine lacks (it has huggingface_hub
#                      1.33, safetensors 0.8, filelock, regex, requests, Pillow, numpy)
#   gguf 0.19.0        the GGUF reader kiln.llm loads files with (its numpy, pyyaml and tqdm are
#                      on the machine)
#   nanobind 3.1.0, scikit-build-core 0.11.6, pathspec 1.1.1
#                      the build of kiln's extension (pyproject.toml: nanobind >= 3.1 for the
#                      fp8 DLPack dtype codes)
#
# Wheels for CPython 3.12 on x86-64 Linux (the GPU machine's python3); no dependencies are
# resolved (--no-deps), so each one needed is named here, one version each.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  diffusers==0.42.1 torchao==0.17.0 importlib_metadata==8.7.0 gguf==0.19.0 nanobind==3.1.0 \
  scikit-build-core==0.11.6 pathspec==1.1.1
ls -l .whl
du -sh .whl  # travels with the working tree: 64 MiB in all
