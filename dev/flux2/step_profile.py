#!/usr/bin/env python3
"""Where a Flux.2 klein 4B transformer step spends its GPU time (python/kiln/diffusers/NOTES.md,
"Flux.2 klein 4B on an H100"): the step of `kiln bench flux2` (klein 4B's configs, random bf16
weights, batch 1, 512 text tokens, one resolution) under torch.profiler for each contender, its
kernels summed per step and grouped (GEMM, attention, norm, RoPE, quantize, activation, conv,
copy / elementwise, other), with the largest kernels named.

kiln fp8 is profiled with CUDA graphs off (kiln.diffusers.apply(graphs=False)), so that every
launch is its own profiler event; its wall time per step is also measured with graphs on, the
time `kiln bench flux2` reports, and the difference between that wall time and the summed kernel
time is the step's idle GPU time. kiln.diffusers.apply itself runs under cProfile (CUDA
synchronized at its end): its wall time and the functions that took most of it are printed (the
bench's "first call with a warm JIT cache" is apply plus the first forward). Before profiling, each contender's step output is compared with
diffusers bf16's on the same weights and inputs (relative error, printed). The peers: diffusers
bf16 eager, and with --peers torchao fp8 + compile (torchao's PerRow recipe and
compile_repeated_blocks, as the bench; its compilation takes minutes).

  python3 dev/flux2/step_profile.py                  # 1024², kiln fp8 and diffusers bf16 (~1 min)
  python3 dev/flux2/step_profile.py --peers torchao  # and torchao fp8 + compile (~4 min)
  python3 dev/flux2/step_profile.py --resolution 1792 --kiln fp8 bf16
  python3 dev/flux2/step_profile.py --full           # every kiln mode and torchao (~5 min)
"""

import cProfile
import io
import pstats
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

NAME = "dev_flux2_step_profile"
KILN_MODES = {"fp8": dict(weights="fp8", activations="fp8"),
              "fp8-gemm": dict(weights="fp8", activations="bf16"),
              "bf16": dict(weights="bf16")}
TOP_KERNELS = 12
TOP_FUNCTIONS = 12  # of apply's cProfile
# Kernel name patterns, tried in this order (the first match names the group): attention before
# GEMM (Hopper attention kernels are named sm90 too), conv before GEMM (implicit GEMM convs).
GROUPS = [
    ("attention", r"attention|flash|fmha|sdpa|prefill|split_kv"),
    ("rope", r"rope"),
    ("norm", r"norm"),
    ("quantize", r"quantiz|amax|float8|fp8|scale_vectors"),
    ("activation", r"glu|gelu|silu|activation"),
    ("conv", r"conv"),
    ("gemm", r"gemm|gemv|xmma|cutlass|nvjet|cublas|matmul|_mm_|sm90_|sm80_"),
    ("copy / elementwise", r"copy|cat|transpose|permute|elementwise|reduce|fill|memset|memcpy|"
                           r"triton_|index"),
]


def kernel_group(name: str) -> str:
    """The group of a kernel name (GROUPS, case-insensitive), or "other"."""
    lowered = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, lowered):
            return group
    return "other"


def summarize(events, steps: int) -> tuple[dict, list]:
    """({group: ms per step}, [(name, ms per step, calls per step)] largest first) from
    (name, total device µs, calls) triples over `steps` steps."""
    groups: dict = defaultdict(float)
    kernels = []
    for name, micros, calls in events:
        ms = micros / 1e3 / steps
        groups[kernel_group(name)] += ms
        kernels.append((name, ms, calls / steps))
    kernels.sort(key=lambda k: -k[1])
    return dict(groups), kernels


def profile_events(torch, step, steps: int) -> list:
    """(name, total device µs, calls) of every CUDA kernel, memset and copy of `steps` calls."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = []
    for e in prof.key_averages():
        micros = getattr(e, "self_device_time_total", None)
        if micros is None:
            micros = e.self_cuda_time_total
        if micros > 0:
            events.append((e.key, micros, e.count))
    return events


def main(argv=None) -> int:
    p = harness.parser(__doc__)
    p.set_defaults(reps=3, warmup=2)
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels")
    p.add_argument("--kiln", nargs="+", default=["fp8"], choices=list(KILN_MODES),
                   help="kiln.diffusers modes to profile")
    p.add_argument("--peers", nargs="*", default=[], choices=["torchao"],
                   help="peers beyond diffusers bf16 eager")
    args = p.parse_args(argv)
    if args.full:
        args.kiln, args.peers = list(KILN_MODES), ["torchao"]
    if args.resolution <= 0 or args.resolution % 16:
        p.error(f"--resolution {args.resolution}: expected a positive multiple of 16")
    torch = harness.cuda_torch(NAME)
    run = harness.Run(NAME, args, torch)
    try:
        import diffusers
    except ImportError as error:
        print(f"{NAME}: needs diffusers ({error}; scripts/fetch_bench_wheels.sh)")
        return 1
    import kiln.diffusers
    from kiln.bench.suites import flux2

    transformer, vae = flux2.build_models(torch, diffusers, run.device, torch.bfloat16)
    pipe = flux2.make_pipeline(diffusers, transformer, vae)
    inputs = flux2.step_inputs(torch, pipe, args.resolution, run.device)
    run.environment.update(resolution=args.resolution, diffusers=diffusers.__version__)

    def step():
        return transformer(**inputs)[0]

    with torch.no_grad():
        reference = step()
        wall = flux2.wall_ms(torch, step, args.warmup, args.reps)
        profile_contender(run, torch, "diffusers bf16", step, reference, args, wall)
        for mode in args.kiln:
            handle = profile_apply(torch.cuda.synchronize, lambda: kiln.diffusers.apply(pipe, **KILN_MODES[mode]),
                                   f"kiln {mode}")
            step()  # the graph's capture
            wall = flux2.wall_ms(torch, step, args.warmup, args.reps)
            handle.remove()
            handle = kiln.diffusers.apply(pipe, **KILN_MODES[mode], graphs=False)
            profile_contender(run, torch, f"kiln {mode}", step, reference, args, wall,
                              graphed=True)
            handle.remove()
        if "torchao" in args.peers:
            flux2.fp8_recipe(_Log(), torch, transformer)
            transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
            wall = flux2.wall_ms(torch, step, args.warmup, args.reps)
            profile_contender(run, torch, "torchao fp8+compile", step, reference, args, wall)
    run.write()
    return 0


def profile_apply(sync, apply, name: str):
    """apply() under cProfile, sync() (the device's synchronize) before and after: prints its wall time and the
    TOP_FUNCTIONS functions with the most time of their own; returns what apply() returned."""
    sync()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    handle = apply()
    sync()
    profiler.disable()
    seconds = time.perf_counter() - start
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(TOP_FUNCTIONS)
    print(f"{name}: apply {seconds:.2f} s; its functions by own time:", flush=True)
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip()), flush=True)
    return handle


class _Log:
    """The `bench` flux2.fp8_recipe reports to: its lines printed."""

    @staticmethod
    def log(text: str) -> None:
        print(text, flush=True)


def profile_contender(run, torch, name, step, reference, args, wall, graphed=False) -> None:
    """Checks one contender's step against diffusers bf16's output, then profiles it: a row per
    kernel group (and the idle time, the wall time `wall` less the kernels), then its largest
    kernels."""
    error = harness.relative_error(torch, step(), reference)
    groups, kernels = summarize(profile_events(torch, step, args.reps), args.reps)
    total = sum(groups.values())
    idle = max(wall - total, 0.0)
    print(f"{name}: step {wall:.2f} ms wall{' (CUDA graphs)' if graphed else ''}, "
          f"{total:.2f} ms of kernels, error vs diffusers bf16 {error:.3g}", flush=True)
    for group, ms in sorted(groups.items(), key=lambda g: -g[1]):
        run.add(contender=name, group=group, ms=ms, share=ms / total, wall_ms=wall)
    run.add(contender=name, group="idle (wall - kernels)", ms=idle, share=idle / wall,
            wall_ms=wall)
    for kernel, ms, calls in kernels[:TOP_KERNELS]:
        run.add(contender=name, kernel=kernel[:100], group=kernel_group(kernel), ms=ms,
                calls=calls)


if __name__ == "__main__":
    sys.exit(main())
