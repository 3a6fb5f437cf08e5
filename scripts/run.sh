#!/usr/bin/env bash
# kiln's main job: set up, build and install the Python package, then `kiln bench` on the
# default device (every suite, or the one named: scripts/run.sh rope).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
.venv/bin/python -m pip install -q --no-build-isolation "$root"
.venv/bin/kiln bench "$@"
