"""LLM prefill and decode end to end: kiln.llm against llama.cpp's CUDA backend on the same GGUF.

Models: kiln.llm.synthetic's random-weight files shaped as Llama-3-8B and Qwen3-8B, Q8_0
weights, written on first use into $KILN_LLM_MODEL_DIR (default: the temp folder; 8.5 GB a
file, about a minute each with the GPU quantizing).

Cases, as llama-bench names them: pp512 (a 512-token prefill) and tg128 (128 greedy decode steps,
one token each) at depth 0, 4096 and 32768 (tokens already in the KV cache), in tokens/s (the
table shows ms: per 512-token prefill, per decoded token).

Peers, measured in the same run on the same file:
  llama.cpp        llama-bench (-p 512 -n 128 -d 0,4096,32768 -fa 1) of the CUDA build that
                   dev/llm/llama_cpp.sh builds into .peers/llama.cpp/build-cuda
                   ($KILN_LLAMA_BENCH names another); skipped, and said so, when absent
  bandwidth floor  for tg128: (weight bytes + KV bytes of the depth) per token / this GPU's copy
                   bandwidth

Checks (the issue's targets): tg128 >= 1.15x llama.cpp at depth 0 and >= 1.3x at 32768, >= 85%
of the bandwidth floor at depth 0, pp512 >= 1.0x llama.cpp, first token <= 2 s after start-up
(a fresh `kiln generate` process, warm JIT disk cache), and kiln's logits against llama.cpp's
CUDA logits for a fixed prompt (same greedy tokens; relative error stated).
"""

import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from ... import cuda_unavailable_reason
from ..core import Measurement

NAME = "llm"
DESCRIPTION = "LLM pp512 / tg128 at depth 0, 4096, 32768 vs llama.cpp CUDA on the same GGUF"

MODELS = [("llama-8b", "q8_0"), ("qwen3-8b", "q8_0")]
DEPTHS = (0, 4096, 32768)
PP, TG = 512, 128
REPS = 3
# The targets, as kiln time / peer time (a check passes below its target).
TG_SPEEDUP = {0: 1.15, 32768: 1.3}
FLOOR_SHARE = 0.85
PP_SPEEDUP = 1.0
FIRST_TOKEN_S = 2.0
# Logits against llama.cpp's CUDA build: prompt, steps, and the bound of the relative error
# (both sides quantize activations differently; tests/python/test_llm.py states the CPU figures).
LOGITS_PROMPT = [1, 7, 42, 300, 11, 99, 256, 123]
LOGITS_STEPS = 16
LOGITS_ERROR = 3e-2


def _root() -> pathlib.Path:
    return pathlib.Path.cwd()


def _llama_bin(name: str) -> pathlib.Path:
    override = os.environ.get("KILN_LLAMA_BENCH") if name == "llama-bench" else None
    if override:
        return pathlib.Path(override)
    return _root() / ".peers/llama.cpp/build-cuda/bin" / name


def _model_file(bench, shape: str, wtype: str) -> pathlib.Path:
    from ...llm import synthetic

    folder = pathlib.Path(os.environ.get("KILN_LLM_MODEL_DIR")
                          or pathlib.Path(tempfile.gettempdir()) / "kiln-llm-models")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{shape}-{wtype}-seed{synthetic.SEED}.gguf"
    if not path.exists():
        start = time.perf_counter()
        partial = path.with_suffix(".partial")
        synthetic.write(partial, shape, wtype, device=bench.device)
        partial.rename(path)
        bench.log(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in "
                  f"{time.perf_counter() - start:.0f} s")
    return path


def _sync(torch):
    torch.cuda.synchronize()


def _kiln_rates(bench, torch, model, label: str) -> dict:
    """{(test, depth): tokens/s} for pp512 and tg128 at each depth the filter wants (median of
    REPS)."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.hparams.n_vocab
    rates = {}
    for depth in DEPTHS:
        if not (bench.wants(f"pp{PP} d{depth} {label}") or bench.wants(f"tg{TG} d{depth} {label}")):
            continue
        model.reset()
        if depth:
            model.prefill(torch.randint(3, vocab, (depth,), generator=generator))
        prompt = torch.randint(3, vocab, (PP,), generator=generator)
        samples = []
        for rep in range(REPS + 1):  # the first run compiles (or loads) the kernels
            model.length = depth
            _sync(torch)
            start = time.perf_counter()
            model.prefill(prompt)
            _sync(torch)
            if rep:
                samples.append(time.perf_counter() - start)
        rates[("pp", depth)] = PP / statistics.median(samples)
        samples = []
        for rep in range(REPS + 1):  # the first run captures the decode graphs
            model.length = depth
            _sync(torch)
            start = time.perf_counter()
            model.decode(int(prompt[0]), TG)
            _sync(torch)
            if rep:
                samples.append(time.perf_counter() - start)
        rates[("tg", depth)] = TG / statistics.median(samples)
        bench.log(f"kiln depth {depth}: pp{PP} {rates[('pp', depth)]:.0f} tokens/s, "
                  f"tg{TG} {rates[('tg', depth)]:.1f} tokens/s")
    return rates


def _llama_rates(bench, path) -> dict | None:
    """{(test, depth): tokens/s} from llama-bench, or None when its CUDA build is absent."""
    binary = _llama_bin("llama-bench")
    if not binary.exists():
        bench.log(f"llama.cpp peer skipped: no {binary} (build it with "
                  "'dev/llm/llama_cpp.sh build cuda' from the carried source)")
        return None
    depths = ",".join(str(d) for d in DEPTHS)
    command = [str(binary), "-m", str(path), "-p", str(PP), "-n", str(TG), "-d", depths,
               "-fa", "1", "-ngl", "99", "-r", str(REPS), "-o", "json"]
    bench.log("llama.cpp: " + " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        bench.log(f"llama-bench failed ({result.returncode}): {result.stderr[-2000:]}")
        return None
    rates = {}
    for row in json.loads(result.stdout):
        test = "pp" if row["n_gen"] == 0 else "tg"
        rates[(test, int(row["n_depth"]))] = float(row["avg_ts"])
        version = f"{row.get('build_commit', '?')} (build {row.get('build_number', '?')})"
    bench.log(f"llama.cpp {version}: " + ", ".join(
        f"{t}{PP if t == 'pp' else TG} d{d} {v:.1f}" for (t, d), v in sorted(rates.items())))
    return rates


def _first_token_seconds(bench, path) -> float | None:
    """Seconds from the start of a fresh `kiln generate` command (after Python and torch are
    imported) to its first token: loading the weights, the kernels from the JIT disk cache, and
    a 16-token prefill."""
    command = [sys.executable, "-m", "kiln", "generate", str(path), "--prompt-tokens", "16",
               "--tokens", "1"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    match = re.search(r"first token after ([0-9.]+) s", result.stderr)
    if result.returncode != 0 or match is None:
        bench.log(f"kiln generate failed ({result.returncode}): {result.stderr[-2000:]}")
        return None
    bench.log(f"first token {match.group(1)} s after the command started; the whole process "
              f"(interpreter, imports, exit) {wall:.2f} s")
    return float(match.group(1))


def _logits_against_llama_cpp(bench, torch, model, path) -> None:
    dumper = _llama_bin("kiln-llama-logits")
    if not dumper.exists():
        bench.log(f"logits vs llama.cpp CUDA skipped: no {dumper}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        prefix = pathlib.Path(tmp) / "logits"
        result = subprocess.run(
            [str(dumper), str(path), "--prompt", ",".join(map(str, LOGITS_PROMPT)), "--steps",
             str(LOGITS_STEPS), "--out", str(prefix), "--gpu-layers", "99", "--cache", "f16"],
            capture_output=True, text=True)
        if result.returncode != 0:
            bench.log(f"kiln-llama-logits failed: {result.stderr[-2000:]}")
            return
        vocab = model.hparams.n_vocab
        want = np.fromfile(f"{prefix}.logits", dtype=np.float32).reshape(-1, vocab)
        tokens = np.loadtxt(f"{prefix}.tokens", dtype=np.int64).reshape(-1).tolist()
    ids = model.generate(LOGITS_PROMPT, LOGITS_STEPS)
    got = model.logits(LOGITS_PROMPT + tokens[:-1]).double().cpu()
    want64 = torch.from_numpy(want).double()
    error = ((got - want64).norm() / want64.norm()).item()
    same = sum(a == b for a, b in zip(ids, tokens))
    bench.log(f"logits vs llama.cpp CUDA: relative error {error:.2e}; greedy tokens "
              f"{same}/{LOGITS_STEPS} equal")
    bench.check("logits rel. error vs llama.cpp CUDA", error, "", LOGITS_ERROR)
    bench.check("greedy tokens differing from llama.cpp CUDA", LOGITS_STEPS - same, "", 1)


def run(bench) -> None:
    if not bench.cuda:
        bench.log(f"no CUDA device ({cuda_unavailable_reason()}): the llm suite times 8B models "
                  "on a GPU, skipped")
        return
    torch = bench.require_torch()
    from ...llm import load

    copy_gbps = bench.copy_gbps()
    for shape, wtype in MODELS:
        label = f"{shape} {wtype}"
        if not any(bench.wants(f"{t} d{d} {label}") for t in (f"pp{PP}", f"tg{TG}")
                   for d in DEPTHS):
            continue
        path = _model_file(bench, shape, wtype)
        start = time.perf_counter()
        model = load(path, "cuda", context=max(DEPTHS) + PP + TG)
        bench.log(f"{label}: loaded in {time.perf_counter() - start:.1f} s, "
                  f"{model.weight_bytes / 2**30:.2f} GiB of matmul weights, "
                  f"{model.kv_bytes_per_token} KV bytes a token")
        _logits_against_llama_cpp(bench, torch, model, path)
        kiln_rates = _kiln_rates(bench, torch, model, label)
        weight_bytes, kv_per_token = model.weight_bytes, model.kv_bytes_per_token
        del model
        torch.cuda.empty_cache()
        llama_rates = _llama_rates(bench, path) or {}
        first = _first_token_seconds(bench, path)
        if first is not None:
            bench.check(f"first token {label}", first, "s", FIRST_TOKEN_S)
        for (test, depth), rate in sorted(kiln_rates.items()):
            count = PP if test == "pp" else TG
            case = f"{test}{count} d{depth}"
            peers = {}
            if (test, depth) in llama_rates:
                peers["llama.cpp"] = 1e3 / llama_rates[(test, depth)] * (PP if test == "pp"
                                                                         else 1)
            moved = weight_bytes + kv_per_token * depth
            if test == "tg":
                peers["bandwidth floor"] = moved / copy_gbps / 1e6
            kiln_ms = 1e3 / rate * (PP if test == "pp" else 1)
            bench.add(Measurement(
                case=case, shape=label, kiln_ms=kiln_ms, bytes=moved, peers=peers,
                notes={"kiln_tokens_per_s": rate,
                       "llama_cpp_tokens_per_s": llama_rates.get((test, depth)),
                       "unit": "ms per 512-token prefill" if test == "pp" else "ms per token"}))
            if "llama.cpp" in peers:
                target = TG_SPEEDUP.get(depth) if test == "tg" else PP_SPEEDUP
                if target is not None and (test == "tg" or depth == 0):
                    bench.check(f"{case} {label} kiln/llama.cpp time", kiln_ms / peers["llama.cpp"],
                                "x", round(1 / target, 3))
            if test == "tg" and depth == 0:
                bench.check(f"{case} {label} kiln/floor time", kiln_ms / peers["bandwidth floor"],
                            "x", round(1 / FLOOR_SHARE, 3))

