#!/usr/bin/env bash
# kiln's main job: set up, build and install the Python package, then `kiln bench` on the
# default device (every suite, or the one named: scripts/run.sh rope). Without a GPU the bench
# says so and runs its smoke test (numpy only where torch is not installed). Results go to $OUT,
# else ./out/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh --run
python=${KILN_PYTHON:-.venv/bin/python}
"$python" -m pip install -q --no-build-isolation "$root"
"$python" -m kiln bench "$@"
