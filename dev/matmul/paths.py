#!/usr/bin/env python3
"""matmul paths over M (NOTES.md "GEMV v2", "Selection", "Hopper GEMM"): kiln.matmul with each
explicit path (gemv where M <= 16, gemm) and auto (kiln.select_path's choice, named in the row),
on weights [N, K] in each of --formats (e4m3fn with per-row scales, q8_0, bf16), bf16 a and out,
next to torch.matmul on the bf16 weight (cuBLAS). Reports ms, GB/s of weight bytes read with its
share of a 1 GiB device copy's bandwidth (the weight-stream regime, M <= 16) and TFLOP/s.

Before a path is timed on a problem, its output's first, second and last rows are compared with
kiln's CPU reference on the same operands. Times are kiln/bench/timing.py's (median of
CUDA-event-timed calls after warm-up, each queued behind a sleep kernel, inputs rotated past
the L2). On sm_90a the gemm path runs the wgmma GEMM (gemm_sm90.cuh) for fp8 weights; the
mma.sync GEMM's tiles are dev/matmul/gemm_tiles.cpp's.

  python3 dev/matmul/paths.py           # K 4096 x N 14336, M 1 4 16 128, e4m3fn (~15 s)
  python3 dev/matmul/paths.py --full    # the GEMV and selection grids (4 shapes, M 1-128, three
                                        # formats) and the Hopper GEMM's ten shapes
  python3 dev/matmul/paths.py --shapes 3072x9216 --m 1 16 --formats q8_0 bf16
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

NAME = "dev_matmul_paths"
FORMATS = ["e4m3fn", "q8_0", "bf16"]
# K x N of the GEMV and selection tables; the M x K x N of the Hopper GEMM table.
GRID_SHAPES = ["4096x4096", "4096x14336", "14336x4096", "3072x9216"]
GRID_M = [1, 2, 4, 8, 12, 16, 32, 64, 128]
GEMM_PROBLEMS = [(128, 4096, 4096), (128, 4096, 14336), (128, 14336, 4096), (512, 4096, 4096),
                 (512, 4096, 14336), (2048, 4096, 4096), (4608, 3072, 9216), (4608, 3072, 3072),
                 (4608, 3072, 18432), (4608, 9216, 3072)]
GEMV_MAX_M = 16
# Products exact, f32 sums in another order than the f64 reference, both rounded once to bf16.
BOUND = 2.0**-8


def main(argv=None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--shapes", nargs="+", default=["4096x14336"], metavar="KxN",
                   help="weight shapes K x N")
    p.add_argument("--m", nargs="+", type=int, default=[1, 4, 16, 128], help="token counts M")
    p.add_argument("--formats", nargs="+", default=["e4m3fn"], choices=FORMATS,
                   help="weight formats")
    args = p.parse_args(argv)
    try:
        shapes = [parse_shape(s) for s in args.shapes]
    except ValueError:
        p.error(f"--shapes {' '.join(args.shapes)}: expected KxN, e.g. 4096x14336")
    torch = harness.cuda_torch(NAME)
    run = harness.Run(NAME, args, torch)
    from kiln.bench.timing import copy_bandwidth

    copy_gbps = copy_bandwidth(torch, run.timer, run.device)
    run.environment["copy_GB/s"] = copy_gbps
    print(f"copy bandwidth {copy_gbps:.0f} GB/s (1 GiB, read + write)")
    if args.full:
        problems = [(fmt, m, k, n) for fmt in FORMATS for k, n in map(parse_shape, GRID_SHAPES)
                    for m in GRID_M]
        problems += [("e4m3fn", m, k, n) for m, k, n in GEMM_PROBLEMS]
    else:
        problems = [(fmt, m, k, n) for fmt in args.formats for k, n in shapes for m in args.m]
    weights = {}
    for fmt, m, k, n in problems:
        if (fmt, k, n) not in weights:
            weights.clear()  # one weight alive at a time
            weights[(fmt, k, n)] = make_weight(torch, fmt, k, n, run.device)
        run_problem(run, torch, fmt, m, k, n, weights[(fmt, k, n)], copy_gbps)
    run.write()
    return 0


def parse_shape(text: str) -> tuple[int, int]:
    """(K, N) of "KxN", e.g. (4096, 14336) of "4096x14336"; ValueError otherwise."""
    k, n = (int(v) for v in text.split("x"))
    return k, n


def make_weight(torch, fmt, k, n, device):
    """(w, w_scale) on `device` and their CPU copies, and the bf16 weight cuBLAS multiplies."""
    import kiln

    w_float = torch.randn(n, k, device=device) * (torch.rand(n, 1, device=device) + 0.1)
    if fmt == "e4m3fn":
        w, scale = kiln.quantize_fp8(w_float, "e4m3fn", "row")
        dense = kiln.dequantize(w, scale, out_dtype=torch.bfloat16)
    elif fmt == "q8_0":
        w, scale = kiln.quantize_q8_0(w_float), None
        dense = kiln.dequantize(w, out_dtype=torch.bfloat16)
    else:
        w, scale = w_float.to(torch.bfloat16), None
        dense = w
    cpu_scale = scale.cpu() if scale is not None else None
    return {"w": w, "scale": scale, "cpu_w": w.cpu(), "cpu_scale": cpu_scale, "dense": dense,
            "bytes": w.numel() * w.element_size() + (scale.numel() * 4 if scale is not None else 0)}


def run_problem(run, torch, fmt, m, k, n, weight, copy_gbps) -> None:
    import kiln
    from kiln.bench.timing import rotation_count

    a_full = torch.randn(m, k, dtype=torch.bfloat16)
    rows = sorted({0, min(1, m - 1), m - 1})
    want = kiln.matmul(a_full[rows], weight["cpu_w"], w_scale=weight["cpu_scale"])
    count = rotation_count(weight["bytes"] + m * k * 2 + m * n * 2)
    sets = [(torch.randn(m, k, dtype=torch.bfloat16, device=run.device),) for _ in range(count - 1)]
    sets.insert(0, (a_full.to(run.device),))
    auto = kiln.select_path(m, weight["w"], a_dtype="bf16")
    paths = (["gemv"] if m <= GEMV_MAX_M else []) + ["gemm", "auto"]
    for path in paths:
        def call(a, path=path):
            return kiln.matmul(a, weight["w"], w_scale=weight["scale"], path=path)

        harness.poison_next(torch, (m, n), torch.bfloat16, run.device)
        err = harness.relative_error(torch, call(*sets[0])[rows], want)
        if not err <= BOUND:
            raise AssertionError(f"{fmt} {m}x{k}x{n} path {path}: relative error {err:.3g} "
                                 f"against the CPU reference, bound {BOUND:.3g}")
        add_row(run, fmt, m, k, n, f"auto ({auto})" if path == "auto" else path,
                run.time_ms(call, sets), weight["bytes"], copy_gbps, err)
    dense = weight["dense"]
    add_row(run, fmt, m, k, n, "cublas bf16", run.time_ms(lambda a: a @ dense.t(), sets),
            dense.numel() * 2, copy_gbps, None)
    del sets
    torch.cuda.empty_cache()


def add_row(run, fmt, m, k, n, path, ms, weight_bytes, copy_gbps, err) -> None:
    gbps = weight_bytes / ms / 1e6
    run.add(format=fmt, shape=f"{m}x{k}x{n}", path=path, ms=ms, **{"GB/s": gbps},
            copy_share=gbps / copy_gbps, **{"TFLOP/s": 2 * m * n * k / ms / 1e9},
            rel_err="peer" if err is None else err)


if __name__ == "__main__":
    sys.exit(main())
