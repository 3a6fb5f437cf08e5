"""conv2d: kiln's implicit GEMM against cuDNN and im2col + GEMM on the Flux VAE decoder.

Shapes: every distinct convolution of the Flux VAE decoder at 1024² output (latent 16 @128²),
bf16, batch 1, with bias: 3x3 at 512 @128² (conv_in 16->512, mid and up-block 3), 512 @256²
(up-block 2 and the upsample conv after nearest x2 from 128²), 512 @512² (upsample), 512->256 and
256 @512², 256 @1024² (upsample), 256->128 and 128 @1024², conv_out 128->3; 1x1 shortcuts
512->256 @512² and 256->128 @1024². `count` is how often the decoder runs each one.

Each shape runs twice, once per memory format, and each format against its peers, timed in the
same run on the same inputs after their output was checked against kiln's:
  cuDNN NHWC   F.conv2d on channels_last x and w (torch.backends.cudnn.benchmark on)
  cuDNN NCHW   F.conv2d on contiguous x and w
  im2col+GEMM  F.unfold, a bf16 matmul with w as [OC, C KH KW], bias, reshape to NCHW
Peak memory: torch.cuda.max_memory_allocated during one call, above what was allocated before
(inputs excluded: output + workspace). TFLOP/s counts 2 N OC C KH KW OH OW.
The decoder total sums count x time over the shapes for kiln and for cuDNN, per format.
"""

from ... import conv2d, reset_workspace_peak, workspace_peak_bytes
from ..core import Measurement, relative_error
from ..timing import rotation_count

NAME = "conv2d"
DESCRIPTION = "Flux VAE decoder convolutions: kiln implicit GEMM vs cuDNN (NHWC, NCHW), im2col"

# (label, C, OC, H = W, K, count in the decoder)
GPU_SHAPES = [
    ("conv_in", 16, 512, 128, 3, 1),
    ("512@128²", 512, 512, 128, 3, 10),
    ("512@256²", 512, 512, 256, 3, 7),
    ("512@512² up", 512, 512, 512, 3, 1),
    ("512→256@512²", 512, 256, 512, 3, 1),
    ("256@512²", 256, 256, 512, 3, 5),
    ("1x1 512→256@512²", 512, 256, 512, 1, 1),
    ("256@1024² up", 256, 256, 1024, 3, 1),
    ("256→128@1024²", 256, 128, 1024, 3, 1),
    ("128@1024²", 128, 128, 1024, 3, 5),
    ("1x1 256→128@1024²", 256, 128, 1024, 1, 1),
    ("conv_out 128→3@1024²", 128, 3, 1024, 3, 1),
]
CPU_SHAPES = [("small", 16, 16, 16, 3, 1)]
# Both sides round an f32 accumulation to bf16, in different orders: a few bf16 ulps apart.
BF16_BOUND = 2.0**-6


def im2col_gemm(torch, x, w, b, padding):
    """The im2col formulation: unfold x into [N, C KH KW, OH OW], multiply, add bias."""
    n, _, h, width = x.shape
    oc, _, kh, kw = w.shape
    cols = torch.nn.functional.unfold(x, (kh, kw), padding=padding)
    out = w.reshape(oc, -1) @ cols + b[:, None]
    oh = h + 2 * padding - kh + 1
    ow = width + 2 * padding - kw + 1
    return out.reshape(n, oc, oh, ow)


def peak_extra_bytes(torch, device, fn, args, own_workspace: bool = False) -> int:
    """Memory one call allocates beyond what was live before it (output and workspace): torch's
    peak, plus kiln's own workspace peak (which torch does not see) for kiln's call."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    index = torch.device(device).index or 0
    if own_workspace:
        reset_workspace_peak(index)
    out = fn(*args)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    if own_workspace:
        peak += workspace_peak_bytes(index)
    del out
    return peak


def run(bench) -> None:
    torch = bench.require_torch()
    shapes = bench.sizes(GPU_SHAPES, CPU_SHAPES)
    bench.copy_gbps()
    totals = {}
    rows = []
    # cuDNN picks its fastest algorithm per shape; the setting is restored for later suites.
    benchmark_mode = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for label, c, oc, hw, k, count in shapes:
            flop = 2 * oc * c * k * k * hw * hw
            for fmt in ("nhwc", "nchw"):
                case = f"{fmt} {label}"
                if not bench.wants(case):
                    continue
                result = _run_case(bench, torch, case, fmt, c, oc, hw, k, flop)
                rows.append((label, fmt, count, flop, result))
                for name, ms in result["ms"].items():
                    key = (fmt, name)
                    totals[key] = totals.get(key, 0.0) + count * ms
    finally:
        torch.backends.cudnn.benchmark = benchmark_mode
    _log_table(bench, rows, totals)


def _run_case(bench, torch, case, fmt, c, oc, hw, k, flop):
    device = bench.device
    dtype = torch.bfloat16
    pad = k // 2
    memory = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
    x_bytes = c * hw * hw * 2
    out_bytes = oc * hw * hw * 2
    w_bytes = oc * c * k * k * 2
    count = rotation_count(x_bytes + out_bytes) if bench.cuda else 2

    def make_set():
        x = torch.randn(1, c, hw, hw, device=device, dtype=dtype).contiguous(
            memory_format=memory)
        w = (torch.randn(oc, c, k, k, device=device) / (c * k * k) ** 0.5).to(dtype)
        b = torch.randn(oc, device=device, dtype=dtype)
        return x, w.contiguous(memory_format=memory), b

    sets = [make_set() for _ in range(count)]

    def kiln_op(x, w, b):
        return conv2d(x, w, b, padding=pad)

    def cudnn(x, w, b):
        return torch.nn.functional.conv2d(x, w, b, padding=pad)

    def im2col(x, w, b):
        return im2col_gemm(torch, x, w, b, pad)

    peer = _peer_name(bench, fmt)
    contenders = {"kiln": kiln_op, peer: cudnn, "im2col+GEMM": im2col}
    reference = kiln_op(*sets[0])
    if not reference.is_contiguous(memory_format=memory):
        raise AssertionError(f"kiln bench conv2d: kiln's {case} output is not in {fmt}")
    memory_bytes = {}
    for name, fn in contenders.items():
        if name != "kiln":
            try:
                out = fn(*sets[0])
            except torch.OutOfMemoryError:
                bench.log(f"{name} ran out of memory on {case}: peer skipped")
                contenders[name] = None
                torch.cuda.empty_cache()
                continue
            err = relative_error(torch, out, reference, "kiln bench conv2d")
            if err > BF16_BOUND:
                raise AssertionError(
                    f"kiln bench conv2d: {name} disagrees with kiln on {case}: relative error "
                    f"{err:.2e} > {BF16_BOUND:.2e}"
                )
            del out
        if bench.cuda:
            memory_bytes[name] = peak_extra_bytes(torch, device, fn, sets[0], name == "kiln")
    contenders = {name: fn for name, fn in contenders.items() if fn is not None}
    del reference

    timings = {name: bench.timer.time(fn, sets) for name, fn in contenders.items()}
    kiln = timings.pop("kiln")
    shape = f"C{c}→{oc} {hw}² k{k}"
    bench.add(Measurement(
        case=case,
        shape=shape,
        kiln_ms=kiln.ms,
        bytes=x_bytes + w_bytes + out_bytes,
        peers={name: t.ms for name, t in timings.items()},
        host_us={"kiln": kiln.host_us, **{name: t.host_us for name, t in timings.items()}},
        notes={
            "tflops": {"kiln": flop / kiln.ms / 1e9,
                       **{name: flop / t.ms / 1e9 for name, t in timings.items()}},
            "peak_extra_bytes": memory_bytes,
            "rotation_sets": count,
        },
    ))
    del sets
    if bench.cuda:
        torch.cuda.empty_cache()
    return {"ms": {"kiln": kiln.ms, **{name: t.ms for name, t in timings.items()}},
            "memory": memory_bytes}


def _peer_name(bench, fmt) -> str:
    """F.conv2d is cuDNN on CUDA and torch's own kernels on CPU."""
    return f"{'cuDNN' if bench.cuda else 'torch'} {fmt.upper()}"


def _log_table(bench, rows, totals) -> None:
    """TFLOP/s, ratios and peak memory per shape, and the decoder's totals."""
    mib = 2.0**20
    bench.log("shape | fmt | count | kiln TFLOP/s | cuDNN TFLOP/s | im2col TFLOP/s | "
              "cuDNN/kiln time | im2col/kiln time | peak MiB kiln / cuDNN / im2col")
    for label, fmt, count, flop, result in rows:
        ms, mem = result["ms"], result["memory"]
        peer = _peer_name(bench, fmt)
        tf = {name: flop / t / 1e9 for name, t in ms.items()}
        line = (f"{label} | {fmt} | {count} | {tf['kiln']:.0f} | {tf.get(peer, float('nan')):.0f}"
                f" | {tf.get('im2col+GEMM', float('nan')):.0f}"
                f" | {ms.get(peer, float('nan')) / ms['kiln']:.2f}x"
                f" | {ms.get('im2col+GEMM', float('nan')) / ms['kiln']:.2f}x")
        if mem:
            line += " | " + " / ".join(f"{mem.get(n, float('nan')) / mib:.0f}"
                                       for n in ("kiln", peer, "im2col+GEMM"))
        bench.log(line)
    for fmt in ("nhwc", "nchw"):
        peer = _peer_name(bench, fmt)
        if (fmt, "kiln") in totals and (fmt, peer) in totals:
            k, p = totals[(fmt, "kiln")], totals[(fmt, peer)]
            bench.log(f"decoder convolutions {fmt}: kiln {k:.2f} ms, {peer} {p:.2f} ms "
                      f"({p / k:.2f}x)")
