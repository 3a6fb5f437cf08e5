"""Attention: kiln against F.scaled_dot_product_attention's cuDNN and flash backends.

Shapes (bf16, [N, H, L, D] as SDPA takes them):
  prefill  Flux.2 klein B1 H24 D128 non-causal at L = 1536, 4608, 13056 (512², 1024², 1792²);
           LLM B1 H32 D128 causal L = 8192; B4 H16 D64 non-causal L = 4096
  decode   one query, B1 H32 D128 with 4096, 32768, 131072 keys; B8 H32 with 8192 keys;
           GQA 32:8 (B1, 8 KV heads) with 32768 keys

Peers, timed in the same run on the same inputs after their output was checked against kiln's:
  sdpa cudnn   F.scaled_dot_product_attention under sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
  sdpa flash   the same under SDPBackend.FLASH_ATTENTION (FlashAttention-2 inside torch)
  flash_attn / flashinfer   when importable (they are not installed on the GPU machine)
A peer that refuses a case (a backend without GQA, say) is logged and skipped.

Prefill is reported in TFLOP/s (4·N·H·Lq·Lk·D, halved when causal), decode in GB/s of K and V
read. Each case logs kiln's first-call time (NVRTC compile, or a disk-cache hit).
"""

import importlib
import time

from ... import attention, jit
from ..core import Measurement
from ..timing import rotation_count

NAME = "attention"
DESCRIPTION = "attention prefill and decode vs SDPA (cuDNN, flash backends)"

# (case, N, Hq, Hkv, Lq, Lk, D, causal)
GPU_CASES = [
    ("flux 512²", 1, 24, 24, 1536, 1536, 128, False),
    ("flux 1024²", 1, 24, 24, 4608, 4608, 128, False),
    ("flux 1792²", 1, 24, 24, 13056, 13056, 128, False),
    ("llm prefill causal", 1, 32, 32, 8192, 8192, 128, True),
    ("prefill D64", 4, 16, 16, 4096, 4096, 64, False),
    ("decode", 1, 32, 32, 1, 4096, 128, False),
    ("decode", 1, 32, 32, 1, 32768, 128, False),
    ("decode", 1, 32, 32, 1, 131072, 128, False),
    ("decode", 8, 32, 32, 1, 8192, 128, False),
    ("decode GQA 32:8", 1, 32, 8, 1, 32768, 128, False),
]
CPU_CASES = [("small", 1, 2, 2, 64, 64, 64, False), ("small decode", 1, 4, 2, 1, 256, 64, False)]
# bf16 outputs of different summation orders: about 2^-8 relative, with margin.
AGREEMENT = 2e-2


def _optional_peers(bench):
    peers = {}
    try:
        flash_attn = importlib.import_module("flash_attn")
        peers["flash_attn"] = lambda q, k, v, causal: flash_attn.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal
        ).transpose(1, 2)
    except ImportError:
        bench.log("flash_attn not installed: peer skipped")
    try:
        importlib.import_module("flashinfer")
        bench.log("flashinfer installed but not wired as a peer (its layouts differ): skipped")
    except ImportError:
        bench.log("flashinfer not installed: peer skipped")
    return peers


def _sdpa(torch, backend):
    from torch.nn.attention import sdpa_kernel

    functional = torch.nn.functional

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])

    return run


def run(bench) -> None:
    torch = bench.require_torch()
    cases = GPU_CASES if bench.cuda else CPU_CASES
    if not bench.cuda:
        bench.log("no CUDA device: CPU reference backend at small sizes")
    device = bench.device
    from torch.nn.attention import SDPBackend

    peers = {}
    if bench.cuda:
        peers["sdpa cudnn"] = _sdpa(torch, SDPBackend.CUDNN_ATTENTION)
        peers["sdpa flash"] = _sdpa(torch, SDPBackend.FLASH_ATTENTION)
        peers.update(_optional_peers(bench))
        bench.log(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    else:
        peers["sdpa math"] = _sdpa(torch, SDPBackend.MATH)

    for label, n, hq, hkv, lq, lk, d, causal in cases:
        shape = f"B{n} H{hq}" + (f"/{hkv}" if hkv != hq else "") + f" Lq{lq} Lk{lk} D{d}"
        case = label + (" causal" if causal and "causal" not in label else "")
        if not bench.wants(f"{case} {shape}"):
            continue
        _run_case(bench, torch, device, case, shape, n, hq, hkv, lq, lk, d, causal, peers)


def _run_case(bench, torch, device, case, shape, n, hq, hkv, lq, lk, d, causal, peers):
    dtype = torch.bfloat16
    elt = 2
    q_bytes, kv_bytes = n * hq * lq * d * elt, 2 * n * hkv * lk * d * elt
    out_bytes = q_bytes
    decode = lq == 1
    flops = 4 * n * hq * lq * lk * d // (2 if causal else 1)
    count = rotation_count(q_bytes + kv_bytes + out_bytes) if bench.cuda else 2

    def make_set():
        return (torch.randn(n, hq, lq, d, dtype=dtype, device=device),
                torch.randn(n, hkv, lk, d, dtype=dtype, device=device),
                torch.randn(n, hkv, lk, d, dtype=dtype, device=device), causal)

    sets = [make_set() for _ in range(count)]

    def kiln_op(q, k, v, is_causal):
        return attention(q, k, v, causal=is_causal)

    # First call: NVRTC compile (or a disk-cache hit) plus the run.
    before = jit.stats()
    start = time.perf_counter()
    reference = kiln_op(*sets[0])
    if bench.cuda:
        torch.cuda.synchronize(device)
    first_ms = (time.perf_counter() - start) * 1e3
    after = jit.stats()
    compiled = after["compiles"] - before["compiles"]
    if not bench.cuda:
        first = "CPU reference, no kernel"
    elif compiled:
        first = f"{compiled} compile(s), {after['compile_ms'] - before['compile_ms']:.0f} ms NVRTC"
    else:
        first = f"cache hit ({after['disk_hits'] - before['disk_hits']} from disk)"
    bench.log(f"{case} {shape}: first call {first_ms:.0f} ms: {first}")

    contenders = {"kiln": kiln_op}
    for name, fn in peers.items():
        try:
            out = fn(*sets[0])
        except Exception as error:  # a backend that refuses a case is skipped, not fatal
            bench.log(f"{name} refused {case} {shape}: {str(error).splitlines()[0][:160]}")
            continue
        ref32, out32 = reference.float(), out.float()
        err = ((out32 - ref32).norm() / ref32.norm()).item()
        if not err < AGREEMENT:
            raise AssertionError(
                f"kiln bench attention: {name} disagrees with kiln on {case} {shape}: "
                f"relative error {err:.2e} >= {AGREEMENT}")
        contenders[name] = fn
    del reference

    timings = {name: bench.timer.time(fn, sets) for name, fn in contenders.items()}
    kiln = timings.pop("kiln")
    peer_ms = {name: t.ms for name, t in timings.items()}

    def rate(ms):
        return kv_bytes / ms / 1e6 if decode else flops / ms / 1e9

    unit = "GB/s of K+V" if decode else "TFLOP/s"
    parts = [f"kiln {rate(kiln.ms):.4g}"] + [
        f"{name} {rate(ms):.4g} (kiln {ms / kiln.ms:.2f}x)" for name, ms in peer_ms.items()]
    bench.log(f"{case} {shape}: {unit}: " + ", ".join(parts))
    bench.add(Measurement(
        case=case,
        shape=shape,
        kiln_ms=kiln.ms,
        bytes=kv_bytes if decode else q_bytes + kv_bytes + out_bytes,
        peers=peer_ms,
        host_us={"kiln": kiln.host_us, **{name: t.host_us for name, t in timings.items()}},
        notes={
            "unit": unit,
            "kiln_rate": rate(kiln.ms),
            "peer_rates": {name: rate(ms) for name, ms in peer_ms.items()},
            "flops": flops,
            "first_call_ms": first_ms,
            "first_call": first,
            "rotation_sets": count,
        },
    ))
    del sets
    if bench.cuda:
        torch.cuda.empty_cache()
