"""The `kiln` command, run as `python -m kiln` in a subprocess with a scratch KILN_CACHE_DIR."""

import json
import os
import subprocess
import sys

import pytest

import kiln

from conftest import HAS_CUDA


def kiln_cmd(*args, cache_dir, out_dir=None, check=True):
    env = dict(os.environ, KILN_CACHE_DIR=str(cache_dir))
    env.pop("OUT", None)
    if out_dir is not None:
        env["OUT"] = str(out_dir)
    result = subprocess.run(
        [sys.executable, "-m", "kiln", *args], env=env, capture_output=True, text=True
    )
    if check:
        assert result.returncode == 0, f"kiln {' '.join(args)}: {result.stderr}"
    return result


def cache_entries(cache_dir):
    listing = kiln_cmd("cache", "list", "--json", cache_dir=cache_dir)
    return json.loads(listing.stdout)["entries"]


def test_cache_warmup_list_clear(tmp_path):
    cache = tmp_path / "cache"
    kiln_cmd("cache", "warmup", "--workload", "flux", "--arch", "sm_80", cache_dir=cache)
    entries = cache_entries(cache)
    assert entries, "warmup stored nothing"
    assert all(e["arch"] == "sm_80" and e["valid"] for e in entries)
    assert all(str(cache) in e["path"] for e in entries)
    text = kiln_cmd("cache", "list", cache_dir=cache).stdout
    assert f"{len(entries)} entries" in text

    again = kiln_cmd("cache", "warmup", "--workload", "flux", "--arch", "sm_80", cache_dir=cache)
    assert " 0 compiled" in again.stdout, again.stdout

    cleared = kiln_cmd("cache", "clear", cache_dir=cache)
    assert f"removed {len(entries)} files" in cleared.stdout
    assert cache_entries(cache) == []


def test_cache_warmup_unknown_workload(tmp_path):
    result = kiln_cmd(
        "cache", "warmup", "--workload", "nope", "--arch", "sm_80", cache_dir=tmp_path, check=False
    )
    assert result.returncode == 1
    assert "workload is 'nope'" in result.stderr


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without a CUDA device")
def test_cache_warmup_without_gpu_needs_arch(tmp_path):
    result = kiln_cmd("cache", "warmup", cache_dir=tmp_path, check=False)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and "--arch" in result.stderr


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without a CUDA device")
def test_bench_rope_on_cpu(tmp_path):
    """Without a GPU the rope suite times the CPU backends at small sizes and writes its JSON."""
    result = kiln_cmd("bench", "rope", "--reps", "3", "--warmup", "1", "--no-chart",
                      cache_dir=tmp_path / "cache", out_dir=tmp_path)
    assert "no CUDA device: CPU backends at small sizes" in result.stderr
    record = json.loads((tmp_path / "bench_rope.json").read_text())
    assert record["suite"] == "rope" and record["kiln"] == kiln.__version__
    assert record["copy_GBps"] > 0
    cases = [m["case"] for m in record["measurements"]]
    assert len(cases) == 10, cases  # 6 Flux cases, decode and prefill of two LLMs
    assert sum(c.startswith("llm ") for c in cases) == 4
    for m in record["measurements"]:
        assert m["kiln_ms"] > 0 and m["peers_ms"]["eager"] > 0
    assert "op / shape" in result.stdout


def test_bench_requires_suite_placeholder_for_several(tmp_path):
    result = kiln_cmd("bench", "--json", str(tmp_path / "x.json"), cache_dir=tmp_path, check=False)
    assert result.returncode == 2 and "{suite}" in result.stderr


# Each op suite's CPU path: kiln's CPU reference against eager torch at small sizes, every peer
# checked against kiln's output before timing (a disagreement fails the command).
OP_SUITES = {
    "norm": ["layer_norm+adaln bf16", "layer_norm+adaln fp8", "rms_norm bf16->bf16",
             "rms_norm f32->bf16", "group_norm+silu nhwc", "group_norm+silu nchw"],
    "activation": ["swiglu bf16", "swiglu fp8", "gelu_tanh bf16", "gelu_tanh fp8"],
}


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without a CUDA device")
@pytest.mark.parametrize("suite", sorted(OP_SUITES))
def test_bench_op_suite_on_cpu(tmp_path, suite):
    result = kiln_cmd("bench", suite, "--reps", "2", "--warmup", "1", "--no-chart",
                      cache_dir=tmp_path / "cache", out_dir=tmp_path)
    assert "no CUDA device: CPU backends at small sizes" in result.stderr
    record = json.loads((tmp_path / f"bench_{suite}.json").read_text())
    assert record["suite"] == suite and record["gpu"] == "none"
    cases = {m["case"] for m in record["measurements"]}
    assert cases == set(OP_SUITES[suite])
    for m in record["measurements"]:
        assert m["kiln_ms"] > 0 and m["peers_ms"]["eager"] > 0
        assert m["peers_ms"]["bytes floor"] > 0
        assert "torch.compile" not in m["peers_ms"]  # compiled peers run on a GPU only


def test_bench_default_list_filter_and_all():
    """A suite's default list runs by default; --filter picks among every case; --all runs all."""
    from kiln.bench import Bench

    bench = Bench(1, 1, 0, None)
    assert bench.wants("swiglu fp8 llama-8b M4", True)
    assert not bench.wants("swiglu fp8 llama-8b M4", False)
    bench.all_cases = True
    assert bench.wants("swiglu fp8 llama-8b M4", False)
    picked = Bench(1, 1, 0, "M4")
    assert picked.wants("swiglu fp8 llama-8b M4", False)
    assert not picked.wants("swiglu fp8 llama-8b M1", True)
