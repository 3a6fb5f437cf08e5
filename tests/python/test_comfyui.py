"""The ComfyUI custom node (comfyui/comfyui-kiln) loaded the way ComfyUI loads custom nodes:
nodes.load_custom_node imports a folder's __init__.py with importlib under the folder's name and
reads NODE_CLASS_MAPPINGS from it."""

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import kiln.torch as kiln_torch
from conftest import HAS_CUDA

NODE_DIR = Path(__file__).resolve().parents[2] / "comfyui" / "comfyui-kiln"
ORIGINAL_SCALED_MM = torch._scaled_mm


def load_custom_node(module_path: Path):
    """What ComfyUI's nodes.load_custom_node does for a folder: spec from __init__.py, module
    registered in sys.modules under the folder's name, executed, mappings read."""
    module_name = module_path.name
    spec = importlib.util.spec_from_file_location(module_name, module_path / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[module_name]
    return module


def test_node_applies_patch_on_load():
    assert not kiln_torch.is_patched()
    try:
        module = load_custom_node(NODE_DIR)
        assert module.NODE_CLASS_MAPPINGS == {} and module.NODE_DISPLAY_NAME_MAPPINGS == {}
        assert kiln_torch.is_patched()
        assert torch._scaled_mm is not ORIGINAL_SCALED_MM
        # The patched function runs: fp8 operands on CPU go to kiln.
        a = torch.randn(3, 32).to(torch.float8_e4m3fn)
        w = torch.randn(16, 32).to(torch.float8_e4m3fn)
        one = torch.tensor(1.0)
        out = torch._scaled_mm(a, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        want = a.double() @ w.double().t()
        assert torch.allclose(out.double(), want, rtol=1e-6, atol=1e-6)
        load_custom_node(NODE_DIR)  # a second load (ComfyUI reload) is harmless
        assert kiln_torch.is_patched()
    finally:
        kiln_torch.unpatch()
    assert torch._scaled_mm is ORIGINAL_SCALED_MM


@pytest.fixture
def comfy_model_management(monkeypatch):
    """ComfyUI's comfy.model_management as far as the node touches it: supports_fp8_compute(),
    which says no (as ComfyUI does before sm_89). ComfyUI imports it before custom nodes."""
    calls = []

    def supports_fp8_compute(device=None):
        calls.append(device)
        return False

    comfy = types.ModuleType("comfy")
    management = types.ModuleType("comfy.model_management")
    management.supports_fp8_compute = supports_fp8_compute
    comfy.model_management = management
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", management)
    return management, supports_fp8_compute, calls


def test_node_enables_comfyui_fp8_compute(comfy_model_management):
    management, original, calls = comfy_model_management
    try:
        load_custom_node(NODE_DIR)
        wrapped = management.supports_fp8_compute
        assert wrapped is not original and wrapped.kiln_original is original
        load_custom_node(NODE_DIR)  # not wrapped twice
        assert management.supports_fp8_compute is wrapped
        assert wrapped(torch.device("cpu")) is False  # kiln's fp8 matmuls are CUDA ones
        assert calls == [torch.device("cpu")]  # ComfyUI's own answer is asked first
        if HAS_CUDA:
            want = torch.cuda.get_device_capability() >= (8, 0)
            assert wrapped(torch.device("cuda", 0)) is want and wrapped(None) is want
    finally:
        kiln_torch.unpatch()


def test_node_respects_kiln_patch_0():
    env = {**os.environ, "KILN_PATCH": "0"}
    script = (
        "import importlib.util, sys, torch\n"
        "spec = importlib.util.spec_from_file_location(\n"
        f"    'comfyui-kiln', r'{NODE_DIR / '__init__.py'}')\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "import kiln.torch\n"
        "assert not kiln.torch.is_patched(), 'patched despite KILN_PATCH=0'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
