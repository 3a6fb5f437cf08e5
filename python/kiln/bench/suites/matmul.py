"""Quantized matmul: kiln.matmul against what users run today for fp8 and Q8_0 weights.

Shapes (M x K x N, out = a [M, K] . w[N, K]^T): ANCHORS.md's LLM decode / prefill table, and
Flux.2 klein's linears at 1024² (M = 4608 tokens; K x N = 3072 x 9216 (QKV), 3072 x 3072
(proj), 3072 x 18432 (MLP in), 9216 x 3072 (MLP out)).

Cases:
  fp8 w        e4m3fn weight, one f32 scale per output channel; activations bf16; every shape
  q8_0 w       ggml Q8_0 weight; activations bf16; M <= 8
  fp8 x fp8    e4m3fn activations and weight, per-tensor scales (ComfyUI's fp8 recipe); M <= 16
               (what kiln.torch.patch() routes to kiln on fp8 GPUs) and M >= 512

Peers, timed in the same run on the same inputs after their output was checked against kiln's:
  bf16 matmul          torch.matmul on a bf16 copy of the dequantized weight (cuBLAS)
  torch._scaled_mm     cuBLASLt fp8 x fp8 (row-wise scales in the weight-only cases, with the
                       activations quantized to fp8 beforehand, not timed; per-tensor in fp8 x
                       fp8), M padded to 16 below 16 (checked against kiln's fp8 x fp8 on the
                       same operands)
  dequant+matmul       what frameworks without fp8 support do: dequantize the whole weight to
                       bf16 (scale applied), then torch.matmul
  kiln prepared        kiln.matmul on kiln.prepare_weight's copy of the weight (the layout the
                       large-M path reads fastest here; weight-only cases with M > 16): what a
                       caller that prepares its weights once gets
  comfy_kitchen        ComfyUI's fp8 linear: comfy_kitchen's QuantizedTensor
                       (TensorCoreFP8Layout, per-tensor scales) through F.linear, fp8 x fp8 only
                       (its layout has no per-channel scale), when importable

Figures: small M (<= 16) is a weight stream: the table's GB/s and % of copy bandwidth count the
weight bytes alone. Larger M is compute: TFLOP/s = 2·M·N·K / time, in the case name. The case
name also says which path kiln's `auto` chose (kiln.select_path).
"""

import importlib.metadata

from ... import matmul, prepare_weight, quantize_fp8, quantize_q8_0, select_path
from ..core import Measurement
from ..timing import rotation_count

NAME = "matmul"
DESCRIPTION = "fp8 / Q8_0 weight matmul vs bf16 cuBLAS, torch._scaled_mm, dequantize+matmul"

# (label, M, K, N)
LLM_SHAPES = [
    ("llm", 1, 4096, 4096), ("llm", 1, 4096, 14336), ("llm", 1, 14336, 4096),
    ("llm", 4, 4096, 4096), ("llm", 4, 4096, 14336),
    ("llm", 128, 4096, 4096), ("llm", 128, 4096, 14336), ("llm", 128, 14336, 4096),
    ("llm", 512, 4096, 4096), ("llm", 512, 4096, 14336), ("llm", 2048, 4096, 4096),
]
FLUX_SHAPES = [
    ("flux 1024²", 4608, 3072, 9216), ("flux 1024²", 4608, 3072, 3072),
    ("flux 1024²", 4608, 3072, 18432), ("flux 1024²", 4608, 9216, 3072),
]
CPU_SHAPES = [("cpu", 1, 256, 384), ("cpu", 8, 256, 384), ("cpu", 512, 256, 256)]
GEMV_MAX_M = 16  # weight-stream regime: figures in GB/s of weight bytes
Q8_0_MAX_M = 8
FP8_FP8_MIN_M = 512
FP8_MAX = 448.0
# Relative (Frobenius) bound between kiln and a peer on the same operands: both round the
# output to bf16 and the dequantized bf16 weight once more (2^-9 each).
CHECK_BOUND = 1e-2


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown: no package metadata)"


def relative_error(torch, got, want) -> float:
    want64 = want.double()
    norm = want64.norm().item()
    if not norm > 0:
        raise AssertionError("kiln bench matmul: reference output is all zeros")
    return ((got.double() - want64).norm() / norm).item()


def run(bench) -> None:
    torch = bench.require_torch()
    if bench.cuda:
        shapes = LLM_SHAPES + FLUX_SHAPES
    else:
        bench.log("no CUDA device: CPU backends at small sizes")
        shapes = CPU_SHAPES
    bench.copy_gbps()
    ck = None
    if bench.cuda:
        try:
            import comfy_kitchen as ck
            from comfy_kitchen.tensor import QuantizedTensor, TensorCoreFP8Layout  # noqa: F401

            bench.log(f"comfy_kitchen {_version('comfy-kitchen')}: QuantizedTensor fp8 linear")
        except ImportError:
            bench.log("comfy_kitchen not installed: peer skipped")
            ck = None
    summary, failed = [], []
    for label, m, k, n in shapes:
        shape = f"{label} {m}x{k}x{n}"
        cases = ["fp8 w"]
        if m <= Q8_0_MAX_M:
            cases.append("q8_0 w")
        if m >= FP8_FP8_MIN_M or m <= GEMV_MAX_M:
            cases.append("fp8 x fp8")
        for case in cases:
            if not bench.wants(f"{case} {shape}"):
                continue
            try:
                summary.append(_run_case(bench, torch, case, shape, m, k, n, ck))
            except (AssertionError, RuntimeError) as error:  # a wrong or failing kiln case
                bench.log(f"FAILED {case} {shape}: {error}")
                failed.append(f"{case} {shape}")
                if bench.cuda:
                    torch.cuda.empty_cache()
    if summary:
        bench.log("summary (kiln figure; auto path; peer/kiln ratios):")
        for line in summary:
            bench.log("  " + line)
    # Every case must run and agree with its peers: a failed one fails the run.
    bench.check("matmul cases failed", len(failed), "cases", 1)


def _weight_bytes(case: str, n: int, k: int) -> int:
    """Bytes of the weight as kiln reads it: Q8_0 blocks, or fp8 values and their f32 scale."""
    if case == "q8_0 w":
        return n * k // 32 * 34
    return n * k + 4 * (1 if case == "fp8 x fp8" else n)


def _weights(torch, case: str, n: int, k: int, device):
    """(w as kiln takes it, its scale or None, bf16 dequantized copy)."""
    w = torch.randn(n, k, device=device) * (0.5 + torch.rand(n, 1, device=device))
    if case == "q8_0 w":
        q = quantize_q8_0(w)
        blocks = q.view(n, k // 32, 34)
        d = blocks[..., :2].contiguous().view(torch.float16).float()
        qs = blocks[..., 2:].contiguous().view(torch.int8).float()
        return q, None, (qs * d).reshape(n, k).to(torch.bfloat16)
    q, scale = quantize_fp8(w, "e4m3fn", "tensor" if case == "fp8 x fp8" else "row")
    deq = (q.float() * scale.reshape(-1, 1)).to(torch.bfloat16)
    return q, scale, deq


def _run_case(bench, torch, case, shape, m, k, n, ck) -> str:
    device = bench.device
    a_bytes = m * k * 2
    out_bytes = m * n * 2
    w_full_bytes = _weight_bytes(case, n, k)
    set_bytes = w_full_bytes + n * k * 2 + a_bytes + out_bytes
    count = rotation_count(set_bytes) if bench.cuda else 2
    fp8_fp8 = case == "fp8 x fp8"

    def make_set():
        w, w_scale, w_bf16 = _weights(torch, case, n, k, device)
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        a_q, a_scale = quantize_fp8(a, "e4m3fn", "tensor" if fp8_fp8 else "row")
        pad = max(0, 16 - m)
        a_q16 = torch.cat([a_q, a_q.new_zeros(pad, k)]) if pad else a_q
        a_scale16 = (torch.cat([a_scale, a_scale.new_ones(pad)]) if pad and not fp8_fp8
                     else a_scale)
        # kiln.prepare_weight's copy for large M (auto layout: on sm_90 a dequantized bf16 copy).
        prepared = (prepare_weight(w, w_scale) if bench.cuda and with_prepared else None)
        return a, a_q, a_scale, a_q16, a_scale16, w, w_scale, w_bf16, prepared

    with_prepared = not fp8_fp8 and m > GEMV_MAX_M
    sets = [make_set() for _ in range(count)]
    w0 = sets[0][5]
    a_dtype = torch.float8_e4m3fn if fp8_fp8 else torch.bfloat16
    path = select_path(m, w0, a_dtype=a_dtype)

    if fp8_fp8:
        def kiln_op(a, a_q, a_scale, a_q16, a_scale16, w, w_scale, w_bf16, prepared):
            return matmul(a_q, w, w_scale=w_scale, a_scale=a_scale, out_dtype=torch.bfloat16)
    else:
        def kiln_op(a, a_q, a_scale, a_q16, a_scale16, w, w_scale, w_bf16, prepared):
            return matmul(a, w, w_scale=w_scale, out_dtype=torch.bfloat16)

    def bf16_matmul(a, a_q, a_scale, a_q16, a_scale16, w, w_scale, w_bf16, prepared):
        return torch.matmul(a, w_bf16.t())

    def dequant_matmul(a, a_q, a_scale, a_q16, a_scale16, w, w_scale, w_bf16, prepared):
        if case == "q8_0 w":
            blocks = w.view(n, k // 32, 34)
            d = blocks[..., :2].contiguous().view(torch.float16).to(torch.bfloat16)
            qs = blocks[..., 2:].contiguous().view(torch.int8).to(torch.bfloat16)
            return torch.matmul(a, (qs * d).reshape(n, k).t())
        return torch.matmul(a, (w.to(torch.bfloat16) * w_scale.reshape(-1, 1).to(torch.bfloat16))
                            .t())

    def scaled_mm(a, a_q, a_scale, a_q16, a_scale16, w, w_scale, w_bf16, prepared):
        if fp8_fp8:
            return torch._scaled_mm(a_q16, w.t(), scale_a=a_scale.reshape(()),
                                    scale_b=w_scale.reshape(()), out_dtype=torch.bfloat16)
        return torch._scaled_mm(a_q16, w.t(), scale_a=a_scale16.reshape(-1, 1),
                                scale_b=w_scale.reshape(1, -1), out_dtype=torch.bfloat16)

    def kiln_prepared(a, a_q, a_scale, a_q16, a_scale16, w, w_scale, w_bf16, prepared):
        return matmul(a, prepared, out_dtype=torch.bfloat16)

    contenders = {"kiln": kiln_op, "bf16 matmul": bf16_matmul}
    if sets[0][8] is not None:
        contenders[f"kiln prepared ({sets[0][8].layout})"] = kiln_prepared
    if case != "q8_0 w":
        if bench.cuda:
            contenders["torch._scaled_mm" + (" (M->16)" if m < 16 else "")] = scaled_mm
        if fp8_fp8 and ck is not None:
            contenders["comfy_kitchen"] = _comfy_kitchen_linear(torch, ck, sets)
    contenders["dequant+matmul"] = dequant_matmul

    # Each peer is checked against kiln on the same operands: bf16 activations for bf16
    # matmul and dequant+matmul, the fp8 activations for torch._scaled_mm and comfy_kitchen.
    a, a_q, a_scale, w, w_scale = sets[0][0], sets[0][1], sets[0][2], sets[0][5], sets[0][6]
    kiln_bf16_a = matmul(a, w, w_scale=w_scale, out_dtype=torch.bfloat16)
    kiln_fp8_a = (None if case == "q8_0 w" else
                  matmul(a_q, w, w_scale=w_scale, a_scale=a_scale, out_dtype=torch.bfloat16))
    for name, fn in list(contenders.items())[1:]:
        try:
            out = fn(*sets[0])
        except Exception as error:  # a peer that cannot take this case is left out, with a line
            bench.log(f"{name} failed on {case} {shape}: {error}: peer skipped")
            del contenders[name]
            continue
        fp8_peer = name.startswith("torch._scaled_mm") or name == "comfy_kitchen"
        err = relative_error(torch, out[:m], kiln_fp8_a if fp8_peer else kiln_bf16_a)
        if err > CHECK_BOUND:
            raise AssertionError(
                f"kiln bench matmul: {name} disagrees with kiln on {case} {shape}: relative "
                f"error {err:.2e} > {CHECK_BOUND:.0e}"
            )
    del kiln_bf16_a, kiln_fp8_a

    timings = {name: bench.timer.time(fn, sets) for name, fn in contenders.items()}
    kiln = timings.pop("kiln")
    tflops = 2 * m * n * k / kiln.ms / 1e9
    weight_stream = m <= GEMV_MAX_M
    moved = w_full_bytes if weight_stream else w_full_bytes + a_bytes + out_bytes
    figure = (f"{w_full_bytes / kiln.ms / 1e6:.4g} GB/s of weights" if weight_stream
              else f"{tflops:.4g} TFLOP/s")
    label = f"{case} [auto={path}] {figure}"
    peers = {name: t.ms for name, t in timings.items()}
    bench.add(Measurement(
        case=label,
        shape=shape,
        kiln_ms=kiln.ms,
        bytes=moved,
        peers=peers,
        host_us={"kiln": kiln.host_us, **{name: t.host_us for name, t in timings.items()}},
        notes={"rotation_sets": count, "auto_path": path, "tflops": tflops,
               "weight_GBps": w_full_bytes / kiln.ms / 1e6, "m": m, "k": k, "n": n,
               "format": case},
    ))
    del sets
    if bench.cuda:
        torch.cuda.empty_cache()
    ratios = ", ".join(f"{name} {ms / kiln.ms:.2f}x" for name, ms in peers.items())
    return f"{case:10} {shape:28} kiln {kiln.ms:.4f} ms {figure}; auto={path}; {ratios}"


def _comfy_kitchen_linear(torch, ck, sets):
    """ComfyUI's fp8 linear on Hopper: both operands as comfy_kitchen QuantizedTensors
    (TensorCoreFP8Layout: per-tensor scales), dispatched by F.linear to its scaled_mm."""
    from comfy_kitchen.tensor import QuantizedTensor, TensorCoreFP8Layout

    wrapped = {}

    def wrap(q, scale, orig_dtype=torch.bfloat16):
        params = TensorCoreFP8Layout.Params(scale=scale.reshape(()), orig_dtype=orig_dtype,
                                            orig_shape=tuple(q.shape))
        return QuantizedTensor(q, "TensorCoreFP8Layout", params)

    for s in sets:
        wrapped[id(s[1])] = wrap(s[1], s[2])
        wrapped[id(s[5])] = wrap(s[5], s[6])

    def linear(a, a_q, a_scale, a_q16, a_scale16, w, w_scale, w_bf16, prepared):
        return torch.nn.functional.linear(wrapped[id(a_q)], wrapped[id(w)])

    return linear
