"""The `kiln` command, run as `python -m kiln` in a subprocess with a scratch KILN_CACHE_DIR."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import kiln

from conftest import HAS_CUDA


# Runs `kiln` as another user (nobody) when this process is root, so that a folder's permissions
# apply: what the command needs is imported first, while root can still read the interpreter.
AS_USER = """
import os, sys
import kiln, kiln.bench, kiln.cli
kiln.cli.parser().parse_args(sys.argv[1:])  # imports what argparse needs
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
sys.exit(kiln.cli.main(sys.argv[1:]))
"""


def kiln_env(cache_dir, out_dir=None):
    env = dict(os.environ, KILN_CACHE_DIR=str(cache_dir))
    env.pop("OUT", None)
    if out_dir is not None:
        env["OUT"] = str(out_dir)
    return env


def kiln_cmd(*args, cache_dir, out_dir=None, check=True, as_user=False, cwd=None):
    command = [sys.executable, "-c", AS_USER] if as_user else [sys.executable, "-m", "kiln"]
    result = subprocess.run([*command, *args], env=kiln_env(cache_dir, out_dir),
                            capture_output=True, text=True, cwd=cwd)
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
    assert "insufficient" not in result.stderr.lower(), result.stderr


@pytest.fixture(scope="module")
def warm_flux(tmp_path_factory):
    """A cache folder holding the flux workload's kernels for sm_80."""
    cache = tmp_path_factory.mktemp("warm") / "cache"
    kiln_cmd("cache", "warmup", "--workload", "flux", "--arch", "sm_80", cache_dir=cache)
    return cache


def test_read_only_cache_is_read(warm_flux):
    """A cache warmed at build time and shipped read-only: a user who cannot write it reads
    every entry; a warm-up that would have to store something fails."""
    with tempfile.TemporaryDirectory() as scratch:  # a folder another user can reach
        os.chmod(scratch, 0o755)
        check_read_only_cache(warm_flux, Path(scratch) / "shipped")


def check_read_only_cache(warm_flux, cache):
    shutil.copytree(warm_flux, cache)
    entries = sorted(os.listdir(cache))
    os.remove(cache / entries[0])  # one kernel missing from what was shipped
    os.chmod(cache, 0o555)
    try:
        listing = kiln_cmd("cache", "list", "--json", cache_dir=cache, as_user=True)
        record = json.loads(listing.stdout)
        assert record["cache_dir"] == str(cache) and record["writable"] is False
        assert len(record["entries"]) == len(entries) - 1
        assert all(e["valid"] for e in record["entries"])
        text = kiln_cmd("cache", "list", cache_dir=cache, as_user=True).stdout
        assert f"{len(entries) - 1} entries" in text and "read-only" in text
        warm = kiln_cmd("cache", "warmup", "--workload", "flux", "--arch", "sm_80",
                        cache_dir=cache, as_user=True, check=False)
        assert warm.returncode == 1, warm.stdout + warm.stderr
        assert f"{len(entries)} variants, 1 compiled, {len(entries) - 1} already cached, 0 stored" \
            in warm.stdout, warm.stdout
        assert "stored 0 of the 1 kernels it compiled" in warm.stderr, warm.stderr
    finally:
        os.chmod(cache, 0o755)
    assert sorted(os.listdir(cache)) == entries[1:]


def test_cache_list_makes_no_folder(tmp_path):
    cache = tmp_path / "not-yet"
    text = kiln_cmd("cache", "list", cache_dir=cache).stdout
    assert "0 entries" in text and "not created yet" in text
    assert not cache.exists()


def test_cache_list_into_a_closed_pipe(warm_flux):
    """`kiln cache list | head -1`: the reader leaves early; no traceback."""
    command = [sys.executable, "-m", "kiln", "cache", "list"]
    process = subprocess.Popen(command, env=kiln_env(warm_flux), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the command has written anything (it is importing kiln)
    stderr = process.stderr.read()
    assert process.wait() != 0
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


@pytest.mark.parametrize("arch,status,message", [
    ("sm_75", 1, "arch sm_75 is older than sm_80: kiln needs sm_80 or newer"),
    ("sm_90a,sm_61", 1, "kiln needs sm_80 or newer"),
    (",", 2, "names no arch"),
    ("sm80", 1, "is not a CUDA target"),
])
def test_cache_warmup_bad_arch(tmp_path, arch, status, message):
    result = kiln_cmd("cache", "warmup", "--arch", arch, cache_dir=tmp_path / "c", check=False)
    assert result.returncode == status
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line, no ptxas log
    assert not (tmp_path / "c").exists()


def test_cache_warmup_arch_and_device_exclude_each_other(tmp_path):
    result = kiln_cmd("cache", "warmup", "--arch", "sm_80", "--device", "1", cache_dir=tmp_path,
                      check=False)
    assert result.returncode == 2 and "exclude each other" in result.stderr


def test_two_warmups_share_one_folder(tmp_path, warm_flux):
    """Two processes warming one folder compile each kernel once between them."""
    cache = tmp_path / "shared"
    command = [sys.executable, "-m", "kiln", "cache", "warmup", "--workload", "flux", "--arch",
               "sm_80"]
    processes = [subprocess.Popen(command, env=kiln_env(cache), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate() for p in processes]
    compiled = 0
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
        variants, done, cached, stored = map(int, re.search(
            r"(\d+) variants, (\d+) compiled, (\d+) already cached, (\d+) stored", out).groups())
        assert variants == len(os.listdir(warm_flux)) and stored == done
        compiled += done
    assert compiled == len(os.listdir(warm_flux)), outputs
    assert sorted(os.listdir(cache)) == sorted(os.listdir(warm_flux))


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without a CUDA device")
def test_bench_rope_on_cpu(tmp_path):
    """Without a GPU the bench says so and what a GPU run measures, then the rope suite times
    the CPU backends at small sizes as a smoke test and writes its JSON to $OUT."""
    result = kiln_cmd("bench", "rope", "--reps", "3", "--warmup", "1", "--no-chart",
                      cache_dir=tmp_path / "cache", out_dir=tmp_path)
    assert "kiln bench: no GPU here (no " in result.stderr, result.stderr
    assert "rope: Flux RoPE + permute" in result.stderr  # what the GPU run measures
    assert "smoke test" in result.stderr and "a smoke test, not a measurement" in result.stdout
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


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without a CUDA device")
def test_bench_results_go_to_out_folder(tmp_path):
    """Without $OUT, results go to ./out/ (git-ignored in a checkout), not into ./."""
    kiln_cmd("bench", "jit", "--no-chart", cache_dir=tmp_path / "cache", cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / "out")) == ["bench_jit.json"]
    assert sorted(os.listdir(tmp_path)) == ["cache", "out"] or sorted(os.listdir(tmp_path)) == [
        "out"]


@pytest.mark.parametrize("args,message", [
    (("--reps", "0"), "--reps: 0 is below 1"),
    (("--reps", "x"), "--reps: 'x' is not an int"),
    (("--warmup", "-1"), "--warmup: -1 is below 0"),
    (("--device", "-1"), "--device: -1 is below 0"),
])
def test_bench_bad_numbers(tmp_path, args, message):
    result = kiln_cmd("bench", "rope", *args, cache_dir=tmp_path, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_bench_device_out_of_range(tmp_path):
    result = kiln_cmd("bench", "rope", "--device", "5", cache_dir=tmp_path, check=False)
    assert result.returncode == 2 and "--device 5, but" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_bench_without_torch(tmp_path):
    """Where torch is not installed, the bench checks each suite's ops on numpy arrays."""
    script = ("import sys; sys.modules['torch'] = None; import kiln.cli; "
              "sys.exit(kiln.cli.main(sys.argv[1:]))")
    env = kiln_env(tmp_path / "cache", tmp_path)
    for suite, checks in (("rope", 1), ("attention", 1), ("conv2d", 1), ("norm", 3),
                          ("activation", 2), ("matmul", 4)):
        result = subprocess.run([sys.executable, "-c", script, "bench", suite, "--no-chart"],
                                env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "without torch" in result.stderr
        record = json.loads((tmp_path / f"bench_{suite}.json").read_text())
        assert record["torch"] is None and record["smoke_test"] == (not HAS_CUDA)
        assert len(record["checks"]) == checks and all(c["passed"] for c in record["checks"])


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
