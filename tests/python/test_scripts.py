"""scripts/setup.sh and scripts/run.sh choose what to download: run with a stub interpreter
(KILN_PYTHON) that records what it is asked to install and run, and answers whether it has torch.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUB = """#!/usr/bin/env bash
# A python that records its pip installs and commands, and has torch when STUB_TORCH=1.
if [ "$1" = - ]; then cat >/dev/null; [ "${STUB_TORCH:-0}" = 1 ]; exit; fi
if [ "$1 $2 $3" = "-m pip install" ]; then
  for arg in "$@"; do [ -n "${previous:-}" ] && cp "$arg" "$STUB_LOG/requirements.txt"
    previous=; [ "$arg" = -r ] && previous=1; done
fi
echo "$*" >>"$STUB_LOG/calls"
"""
TOOLS = ("cmake", "ninja", "g++", "clang-format")
HAS_GPU = os.path.exists("/dev/nvidia0")
pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in TOOLS) or not Path("/usr/include/gtest/gtest.h").exists()
    or not (os.environ.get("CUDAToolkit_ROOT") or Path("/usr/local/cuda/include/nvrtc.h").exists()),
    reason="needs the build tools setup.sh would otherwise install with apt-get")


def run_script(tmp_path, script, *args, has_torch=False):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = dict(os.environ, KILN_PYTHON=str(stub), STUB_LOG=str(tmp_path),
               STUB_TORCH="1" if has_torch else "0")
    result = subprocess.run([str(ROOT / "scripts" / script), *args], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    requirements = (tmp_path / "requirements.txt").read_text().splitlines()
    packages = {line.split(">")[0].split("=")[0] for line in requirements
                if line and not line.startswith("#")}
    return result, packages, (tmp_path / "calls").read_text().splitlines()


def test_setup_installs_everything_for_the_tests(tmp_path):
    result, packages, calls = run_script(tmp_path, "setup.sh")
    assert {"torch", "numpy", "pytest", "hypothesis", "comfy-kitchen"} <= packages
    assert "using KILN_PYTHON" in result.stdout
    assert not any("venv" in c for c in calls)  # KILN_PYTHON: no .venv of its own


@pytest.mark.skipif(HAS_GPU, reason="needs a machine without a GPU")
def test_main_job_without_gpu_or_torch_downloads_no_torch(tmp_path):
    result, packages, calls = run_script(tmp_path, "run.sh", "rope")
    assert "torch" not in packages and "comfy-kitchen" not in packages
    assert {"numpy", "nanobind", "scikit-build-core"} <= packages
    assert "no GPU and no torch" in result.stdout
    assert calls[-1] == "-m kiln bench rope", calls
    assert any(c.startswith("-m pip install -q --no-build-isolation") for c in calls)


def test_main_job_reuses_the_torch_at_hand(tmp_path):
    result, packages, calls = run_script(tmp_path, "run.sh", has_torch=True)
    assert "torch" in packages  # a requirement already met: pip leaves it
    assert "no GPU and no torch" not in result.stdout
    assert calls[-1] == "-m kiln bench"
