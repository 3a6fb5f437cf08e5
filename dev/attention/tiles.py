#!/usr/bin/env python3
"""Attention tiles and decode K/V loads (NOTES.md: the tile sweeps of the mma.sync kernel and the
decode A/B of cp.async against TMA): kiln.attention on the bench's shapes (bf16, [N, H, L, D])
under each KILN_ATTENTION_TILE (warps_m,warps_n,block_n,stages[,splits]; "default" is the
launcher's plan) and each KILN_ATTENTION_LOADS (tma or cp.async: sm_90a decode only; "default" is
the launcher's choice). Prefill reports TFLOP/s (4 N H Lq Lk D, halved when causal), decode GB/s
of K and V read.

Before a configuration is timed on a case, it runs a small case of the same heads, head dim and
causality (Lq and Lk cut to 67 and 1037, or Lq 1 for decode) and is compared with kiln's CPU
reference. Times are kiln/bench/timing.py's (median of CUDA-event-timed calls after warm-up, each
queued behind a sleep kernel, inputs rotated past the L2).

On sm_90a the prefill cases with D 64 or 128 run the wgmma kernel (prefill_sm90.cuh), which
KILN_ATTENTION_TILE does not change: the harness times their default only there. The mma.sync
prefill sweep runs on sm_80 to sm_89.

  python3 dev/attention/tiles.py            # decode KV 32768: 3 tiles x both loads (~20 s)
  python3 dev/attention/tiles.py --full     # every case; the v1, decode v2 and v4 sweeps
  python3 dev/attention/tiles.py --cases "decode B1 KV131072" --tiles default 1,4,64,2 --loads tma
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

from kiln.bench.suites.attention import GPU_CASES  # noqa: E402

NAME = "dev_attention_tiles"
# (name, N, Hq, Hkv, Lq, Lk, D, causal): kiln bench attention's cases, the plain decode ones named
# by batch and keys ("flux 1024²", "decode B1 KV32768", "decode GQA 32:8", ...).
CASES = [(f"decode B{n} KV{lk}" if label == "decode" else label, n, hq, hkv, lq, lk, d, causal)
         for label, n, hq, hkv, lq, lk, d, causal in GPU_CASES]
# The tiles of NOTES' sweeps: v1 prefill; decode v2 (cp.async) and v4 (TMA), 33 splits included.
PREFILL_TILES = ["default", "4,1,64,2", "4,1,64,3", "4,1,32,2", "4,1,32,3", "8,1,64,2",
                 "8,1,32,2", "8,1,32,3", "4,1,128,2", "2,1,64,3"]
DECODE_TILES = ["default", "1,4,128,3", "1,8,128,3", "1,4,64,3", "1,4,64,5", "1,4,64,2",
                "1,4,128,2", "1,2,64,3", "1,4,64,6", "1,4,64,3,33", "1,4,128,3,33"]
LOADS = ["default", "tma", "cp.async"]
# bf16 attention against the f64 reference: probabilities rounded to bf16 before P V and the
# output rounded to bf16, a few 2^-9 relative; a wrong result is of order 1.
BOUND = 2.0**-6


def main(argv=None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--cases", nargs="+", metavar="CASE", default=["decode B1 KV32768"],
                   help="cases by name: " + ", ".join(c[0] for c in CASES))
    p.add_argument("--tiles", nargs="+", default=["default", "1,4,64,2", "1,4,128,3"],
                   help="KILN_ATTENTION_TILE values, or 'default'")
    p.add_argument("--loads", nargs="+", default=["tma", "cp.async"], choices=LOADS,
                   help="KILN_ATTENTION_LOADS values (decode on sm_90a), or 'default'")
    args = p.parse_args(argv)
    known = {c[0]: c for c in CASES}
    unknown = [name for name in args.cases if name not in known]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(known)}")
    torch = harness.cuda_torch(NAME)
    run = harness.Run(NAME, args, torch)
    hopper = run.environment["arch"] == "sm_90a"
    checks = {}
    for name in [c[0] for c in CASES] if args.full else args.cases:
        case = known[name]
        decode = case[4] == 1
        if args.full:
            tiles = DECODE_TILES if decode else PREFILL_TILES
            loads = LOADS if decode and hopper else ["default"]
        else:
            tiles, loads = args.tiles, args.loads if decode else ["default"]
        if not decode and hopper and case[6] in (64, 128):
            tiles = ["default"]  # the wgmma prefill: no tile to choose
        for load in loads:
            for tile in tiles:
                run_config(run, torch, case, tile, load, checks)
    os.environ.pop("KILN_ATTENTION_TILE", None)
    os.environ.pop("KILN_ATTENTION_LOADS", None)
    run.write()
    return 0


def run_config(run, torch, case, tile, load, checks) -> None:
    import kiln
    from kiln.bench.timing import rotation_count

    name, n, hq, hkv, lq, lk, d, causal = case
    decode = lq == 1
    for variable, value in (("KILN_ATTENTION_TILE", tile), ("KILN_ATTENTION_LOADS", load)):
        if value == "default":
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = value
    config = f"tile {tile}, loads {load}"
    if name not in checks:
        checks[name] = check_case(torch, n, hq, hkv, 1 if decode else 67, 1037, d, causal)
    try:
        err = check(torch, checks[name], causal, run.device)
    except kiln.KilnError as error:  # a tile the kernel cannot take, TMA where it cannot run
        print(f"{name}: {config}: not run: {str(error).splitlines()[0]}", flush=True)
        return
    if not err <= BOUND:
        raise AssertionError(f"{name}: {config}: relative error {err:.3g} against the CPU "
                             f"reference, bound {BOUND:.3g}")
    dtype = torch.bfloat16
    kv_bytes = 2 * n * hkv * lk * d * 2
    count = rotation_count(2 * n * hq * lq * d * 2 + kv_bytes)
    sets = [(torch.randn(n, hq, lq, d, dtype=dtype, device=run.device),
             torch.randn(n, hkv, lk, d, dtype=dtype, device=run.device),
             torch.randn(n, hkv, lk, d, dtype=dtype, device=run.device)) for _ in range(count)]
    ms = run.time_ms(lambda q, k, v: kiln.attention(q, k, v, causal=causal), sets)
    flops = 4 * n * hq * lq * lk * d / (2 if causal else 1)
    rate = {"GB/s": kv_bytes / ms / 1e6} if decode else {"TFLOP/s": flops / ms / 1e9}
    run.add(case=name, tile=tile, loads=load, ms=ms, **rate, rel_err=err)
    del sets
    torch.cuda.empty_cache()


def check_case(torch, n, hq, hkv, lq, lk, d, causal):
    """A small case of the same heads and head dim: (q, k, v, kiln's CPU reference output)."""
    import kiln

    q = torch.randn(n, hq, lq, d, dtype=torch.bfloat16)
    k = torch.randn(n, hkv, lk, d, dtype=torch.bfloat16)
    v = torch.randn(n, hkv, lk, d, dtype=torch.bfloat16)
    return q, k, v, kiln.attention(q, k, v, causal=causal)


def check(torch, case, causal, device) -> float:
    """Relative error of kiln.attention on `device`, under the configuration in the environment,
    against the CPU reference of a check_case."""
    import kiln

    q, k, v, want = case
    q, k, v = q.to(device), k.to(device), v.to(device)
    if q.is_cuda:
        harness.poison_next(torch, want.shape, want.dtype, device)
    got = kiln.attention(q, k, v, causal=causal)
    return harness.relative_error(torch, got, want)


if __name__ == "__main__":
    sys.exit(main())
