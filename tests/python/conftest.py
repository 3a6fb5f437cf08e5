"""Shared fixtures: a fresh random seed per test (printed, so a failure can be replayed) and the
devices to run on (CUDA ones are skipped, and shown as skipped, without a GPU)."""

import secrets

import numpy as np
import pytest
import torch

import kiln

CUDA_REASON = "no CUDA device"
HAS_CUDA = torch.cuda.is_available() and kiln.cuda_available()

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON))]


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
