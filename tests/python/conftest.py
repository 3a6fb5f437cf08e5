"""Shared fixtures: a fresh random seed per test (printed, so a failure can be replayed), the
devices to run on (CUDA ones are skipped, and shown as skipped, without a GPU), and the fuzz
test's seed and time budget, printed in the run's header."""

import os
import secrets

import numpy as np
import pytest
import torch

import kiln

CUDA_REASON = "no CUDA device"
HAS_CUDA = torch.cuda.is_available() and kiln.cuda_available()

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON))]

# tests/python/test_fuzz.py: KILN_FUZZ_SEED replays a run; KILN_FUZZ_SECONDS is its budget.
FUZZ_SEED = int(os.environ.get("KILN_FUZZ_SEED") or secrets.randbits(32))
FUZZ_SECONDS = float(os.environ.get("KILN_FUZZ_SECONDS") or 40)


def pytest_report_header(config):
    return (f"kiln fuzz: seed {FUZZ_SEED} (KILN_FUZZ_SEED={FUZZ_SEED} replays it), "
            f"{FUZZ_SECONDS:g} s (KILN_FUZZ_SECONDS)")


@pytest.fixture(autouse=True)
def seed():
    """Seeds torch and numpy from a fresh random draw; pytest shows the print on failure."""
    value = secrets.randbits(31)
    print(f"seed = {value}")
    torch.manual_seed(value)
    np.random.seed(value)
    return value


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
