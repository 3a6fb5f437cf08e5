"""The tuning harnesses of dev/ (dev/README.md), so that they do not rot between GPU checks: each
answers --help with its run command, refuses a bad argument, and on a machine without a GPU says
"no CUDA device" and exits 0; the Python harnesses' checks against kiln's CPU reference run on
CPU. The C++ harnesses run where they are built (cmake -DKILN_BUILD_DEV=ON; KILN_DEV_BUILD names
the build folder, default build/gpu or build/dev), and are skipped, visibly, elsewhere."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kiln

from conftest import HAS_CUDA

ROOT = Path(__file__).resolve().parents[2]
DEV = ROOT / "dev"
# dev/<family>/ holds the harnesses (dev/common the C++ ones' shared code; dev/jit/compare_sass.py
# compares machine code and times nothing).
FAMILIES = ("rope_flux", "attention", "conv2d", "matmul", "flux2")
PY_HARNESSES = sorted(p for f in FAMILIES for p in (DEV / f).glob("*.py"))
CPP_HARNESSES = sorted(p for f in FAMILIES for p in (DEV / f).glob("*.cpp"))
NO_GPU_ONLY = pytest.mark.skipif(HAS_CUDA, reason="needs a machine without a CUDA device")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def run(*command):
    return subprocess.run(list(command), cwd=ROOT, capture_output=True, text=True, timeout=120)


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpp_binary(source: Path) -> Path:
    """The built harness of dev/<family>/<name>.cpp, or a skip naming how to build it."""
    name = f"dev_{source.parent.name}_{source.stem}"
    folders = [os.environ["KILN_DEV_BUILD"]] if "KILN_DEV_BUILD" in os.environ else [
        ROOT / "build" / "gpu", ROOT / "build" / "dev"]
    for folder in folders:
        binary = Path(folder) / "dev" / name
        if binary.exists():
            return binary
    pytest.skip(f"{name} not built (cmake -DKILN_BUILD_DEV=ON; KILN_DEV_BUILD=<build folder>)")


def test_harnesses_exist_and_are_listed():
    assert PY_HARNESSES and CPP_HARNESSES
    readme = (DEV / "README.md").read_text()
    for path in PY_HARNESSES + CPP_HARNESSES:
        assert rel(path) in readme, f"{rel(path)} is not in dev/README.md"


@pytest.mark.parametrize("path", PY_HARNESSES, ids=rel)
def test_python_harness_help(path):
    result = run(sys.executable, str(path), "--help")
    assert result.returncode == 0, result.stderr
    assert f"python3 {rel(path)}" in result.stdout, "the help holds the run command"
    assert run(sys.executable, str(path), "--bogus").returncode == 2


@NO_GPU_ONLY
@pytest.mark.parametrize("path", PY_HARNESSES, ids=rel)
def test_python_harness_without_gpu(path):
    result = run(sys.executable, str(path))
    assert result.returncode == 0, result.stderr
    assert "no CUDA device" in result.stdout


@pytest.mark.parametrize("path", CPP_HARNESSES, ids=rel)
def test_cpp_harness_help(path):
    binary = cpp_binary(path)
    result = run(str(binary), "--help")
    assert result.returncode == 0, result.stderr
    assert binary.name in result.stdout
    assert run(str(binary), "--bogus").returncode == 1


@NO_GPU_ONLY
@pytest.mark.parametrize("path", CPP_HARNESSES, ids=rel)
def test_cpp_harness_without_gpu(path):
    result = run(str(cpp_binary(path)))
    assert result.returncode == 0, result.stderr
    assert "no CUDA device" in result.stdout


def test_attention_harness_check_runs_on_cpu():
    tiles = load(DEV / "attention" / "tiles.py")
    case = tiles.check_case(torch, 1, 4, 2, 3, 37, 64, True)
    assert case[3].abs().sum() > 0
    assert tiles.check(torch, case, True, "cpu") == 0.0


@pytest.mark.parametrize("fmt", ["e4m3fn", "q8_0", "bf16"])
def test_matmul_harness_weights_on_cpu(fmt):
    paths = load(DEV / "matmul" / "paths.py")
    weight = paths.make_weight(torch, fmt, 64, 48, "cpu")
    a = torch.randn(3, 64, dtype=torch.bfloat16)
    got = kiln.matmul(a, weight["cpu_w"], w_scale=weight["cpu_scale"])
    want = (a.double() @ weight["dense"].double().t()).to(torch.bfloat16)
    # The dense copy is the weight rounded once more to bf16.
    assert paths.harness.relative_error(torch, got, want) < 1e-2
    assert paths.parse_shape("4096x14336") == (4096, 14336)


def test_flux2_profile_groups_kernels():
    profile = load(DEV / "flux2" / "step_profile.py")
    names = {
        "void kiln::attention_prefill_sm90<128, 128>(...)": "attention",
        "kiln::rope_flux_kernel": "rope",
        "kiln::norm_kernel": "norm",
        "kiln::quantize_fp8_rows": "quantize",
        "kiln::activation_kernel": "activation",
        "kiln::conv2d_implicit_gemm_sm90": "conv",
        "sm90_xmma_gemm_e4m3e4m3_e4m3f32_f32_tn_n_tilesize128x128x64": "gemm",
        "nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "gemm",
        "void at::native::elementwise_kernel<128, 2>(...)": "copy / elementwise",
        "triton_poi_fused_add_mul_0": "copy / elementwise",
        "something_else": "other",
    }
    for name, group in names.items():
        assert profile.kernel_group(name) == group, name
    groups, kernels = profile.summarize(
        [("kiln::norm_kernel", 3000.0, 6), ("nvjet_x", 9000.0, 3), ("mystery", 600.0, 3)], 3)
    assert groups == pytest.approx({"norm": 1.0, "gemm": 3.0, "other": 0.2})
    assert [k[0] for k in kernels] == ["nvjet_x", "kiln::norm_kernel", "mystery"]
    assert kernels[1][1:] == pytest.approx((1.0, 2.0))


def test_flux2_profile_apply_prints_its_functions(capsys):
    profile = load(DEV / "flux2" / "step_profile.py")
    synced = []

    def apply():
        return sorted(range(1000), key=lambda i: -i)[0]

    assert profile.profile_apply(lambda: synced.append(1), apply, "kiln fp8") == 999
    printed = capsys.readouterr().out
    assert synced == [1, 1]
    assert printed.startswith("kiln fp8: apply ")
    assert "tottime" in printed and "<lambda>" in printed
