"""Quantized matmul: kiln.matmul against what users run today for fp8 and Q8_0 weights.

Shapes (M x K x N, out = a [M, K] . w[N, K]^T): ANCHORS.md's LLM decode / prefill table, and
Flux.2 klein's linears at 1024² (M = 4608 tokens; K x N = 3072 x 9216 (QKV), 3072 x 3072
(proj), 3072 x 18432 (MLP in), 9216 x 3072 (MLP out)).

Cases:
  fp8 w        e4m3fn weight, one f32 scale per output channel; activations bf16; every shape
  q8_0 w       ggml Q8_0 weight; activations bf16; M <= 8
  fp8 x fp8    e4m3fn activations and weight, per-tensor scales (ComfyUI's fp8 recipe); M <= 16
               (what kiln.torch.patch() routes to kiln on fp8 GPUs) and M >= 512

Epilogue cases (kiln.matmul's gate= / residual=: out = residual + gate * (a . w^T), one rounding):
  fp8 x fp8 +gate+residual   Flux.2 klein's linears that add into the residual stream under an
               AdaLN gate (Flux2TransformerBlock: attn.to_out, K x N = 3072 x 3072; ff.linear_out,
               9216 x 3072) at 1024², M = 4608 (all tokens; a double block runs its image
               stream's 4096 and its text stream's 512 apart, a single block's out projection is
               12288 x 3072): e4m3fn activations with one scale per token (as kiln's fused norm /
               activation quantize writes them), e4m3fn weight with one scale per output channel,
               gate [1, N] a chunk of the modulation output (a strided view), residual and out
               bf16 [1, M, N]
  q8_0 w +residual, bf16 w +residual   an LLM layer's output projection adding into kiln.llm's
               f32 residual stream at decode: 1 x 4096 x 4096, bf16 activations, f32 residual and
               out
  Peers: kiln + torch epilogue (kiln.matmul without gate / residual, then the epilogue in torch:
  residual + gate * y as diffusers writes it, or + residual); for fp8 x fp8
  torch._scaled_mm + epilogue (row-wise scales, bf16 out: torchao's dynamic fp8 recipe with the
  activations already quantized) and torch.compile of that function (the GEMM is cuBLASLt's, the
  epilogue one fused kernel: what torchao + compile runs); for the GEMV bf16 matmul + add (cuBLAS
  on the bf16 weight, or Q8_0's dequantized copy) and the bytes floor (weight, a, residual and
  out at this GPU's copy bandwidth).

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
from ..cases import check_peers, compiled, record, time_contenders
from ..core import relative_error
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
# Epilogue cases: (label, M, K, N, weight formats).
EPILOGUE_SHAPES = [
    ("flux.2 1024² attn out", 4608, 3072, 3072, ("fp8 x fp8",)),
    ("flux.2 1024² mlp out", 4608, 9216, 3072, ("fp8 x fp8",)),
    ("llm", 1, 4096, 4096, ("q8_0 w", "bf16 w")),
]
CPU_EPILOGUE_SHAPES = [("cpu", 48, 256, 128, ("fp8 x fp8",)),
                       ("cpu", 1, 256, 384, ("q8_0 w", "bf16 w"))]
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


def run(bench) -> None:
    torch = bench.require_torch()
    shapes, epilogue_shapes = bench.sizes((LLM_SHAPES + FLUX_SHAPES, EPILOGUE_SHAPES),
                                          (CPU_SHAPES, CPU_EPILOGUE_SHAPES))
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
    for label, m, k, n, formats in epilogue_shapes:
        shape = f"{label} {m}x{k}x{n}"
        for fmt in formats:
            case = f"{fmt} {'+gate+residual' if fmt == 'fp8 x fp8' else '+residual'}"
            if not bench.wants(f"{case} {shape}"):
                continue
            try:
                summary.append(_run_epilogue_case(bench, torch, case, fmt, shape, m, k, n))
            except (AssertionError, RuntimeError) as error:
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
        err = relative_error(torch, out[:m], kiln_fp8_a if fp8_peer else kiln_bf16_a,
                             "kiln bench matmul")
        if not err <= CHECK_BOUND:
            raise AssertionError(
                f"kiln bench matmul: {name} disagrees with kiln on {case} {shape}: relative "
                f"error {err:.2e} > {CHECK_BOUND:.0e}"
            )
    del kiln_bf16_a, kiln_fp8_a

    weight_stream = m <= GEMV_MAX_M
    moved = w_full_bytes if weight_stream else w_full_bytes + a_bytes + out_bytes
    return _record(bench, torch, case, shape, contenders, sets, path, m, k, n, w_full_bytes,
                   moved, notes={"format": case})


def _record(bench, torch, case, shape, contenders, sets, path, m, k, n, weight_bytes, moved,
            floor_bytes=None, notes=None) -> str:
    """Times the contenders over `sets`, records kiln's figure (GB/s of weights at M <= 16, else
    TFLOP/s) in the case name with the path `auto` chose, frees the sets; returns the summary
    line."""
    timings = time_contenders(bench, contenders, sets)
    kiln = timings["kiln"]
    tflops = 2 * m * n * k / kiln.ms / 1e9
    weight_stream = m <= GEMV_MAX_M
    figure = (f"{weight_bytes / kiln.ms / 1e6:.4g} GB/s of weights" if weight_stream
              else f"{tflops:.4g} TFLOP/s")
    measurement = record(
        bench, f"{case} [auto={path}] {figure}", shape, timings, moved, floor_bytes,
        notes={"rotation_sets": len(sets), "auto_path": path, "tflops": tflops,
               "weight_GBps": weight_bytes / kiln.ms / 1e6, "m": m, "k": k, "n": n,
               **(notes or {})})
    sets.clear()
    if bench.cuda:
        torch.cuda.empty_cache()
    ratios = ", ".join(f"{name} {ms / kiln.ms:.2f}x" for name, ms in measurement.peers.items())
    return f"{case:10} {shape:28} kiln {kiln.ms:.4f} ms {figure}; auto={path}; {ratios}"


def gate_residual(y, gate, residual):
    """The epilogue in torch, as diffusers' Flux2 blocks write it after a linear: residual +
    gate * y, gate [B, N] broadcast over the tokens; or residual + y without a gate."""
    return residual + (y if gate is None else gate[:, None] * y)


def _run_epilogue_case(bench, torch, case, fmt, shape, m, k, n) -> str:
    device = bench.device
    fp8_fp8 = fmt == "fp8 x fp8"
    a_bytes = m * k + 4 * m if fp8_fp8 else m * k * 2  # fp8 codes + scales, or bf16
    res_bytes = m * n * (2 if fp8_fp8 else 4)  # residual and out: bf16 (Flux), f32 (kiln.llm)
    w_bytes = n * k * 2 if fmt == "bf16 w" else _weight_bytes("fp8 w" if fp8_fp8 else fmt, n, k)
    moved = a_bytes + w_bytes + 2 * res_bytes + (n * 2 if fp8_fp8 else 0)  # + the gate
    count = rotation_count(moved + n * k * 2) if bench.cuda else 2
    out_dtype = torch.bfloat16 if fp8_fp8 else torch.float32

    def make_set():
        """(a, a_scale, w, w_scale, w as bf16, gate, residual): Flux's fp8 operands with a gate
        chunk [1, N] and a [1, M, N] residual, or an LLM's bf16 row with an f32 residual."""
        if fp8_fp8:
            w, w_scale, w_bf16 = _weights(torch, "fp8 w", n, k, device)
            a, a_scale = quantize_fp8(torch.randn(m, k, device=device), "e4m3fn", "row")
            mod = torch.randn(1, 3 * n, device=device, dtype=torch.bfloat16)
            gate = mod.reshape(1, 3, n)[:, 2]  # [1, N], row stride 3N: the AdaLN gate chunk
            residual = torch.randn(1, m, n, device=device, dtype=torch.bfloat16)
            return a.view(1, m, k), a_scale, w, w_scale, w_bf16, gate, residual
        if fmt == "q8_0 w":
            w, w_scale, w_bf16 = _weights(torch, fmt, n, k, device)
        else:
            w = w_bf16 = (torch.randn(n, k, device=device) / k**0.5).to(torch.bfloat16)
            w_scale = None
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        residual = torch.randn(m, n, device=device)
        return a, None, w, w_scale, w_bf16, None, residual

    def kiln_op(a, a_scale, w, w_scale, w_bf16, gate, residual):
        return matmul(a, w, a_scale=a_scale, w_scale=w_scale, gate=gate, residual=residual,
                      out_dtype=out_dtype)

    def kiln_then_epilogue(a, a_scale, w, w_scale, w_bf16, gate, residual):
        y = matmul(a, w, a_scale=a_scale, w_scale=w_scale, out_dtype=out_dtype)
        return gate_residual(y, gate, residual)

    def scaled_mm_epilogue(a, a_scale, w, w_scale, w_bf16, gate, residual):
        y = torch._scaled_mm(a.reshape(m, k), w.t(), scale_a=a_scale.reshape(-1, 1),
                             scale_b=w_scale.reshape(1, -1), out_dtype=torch.bfloat16)
        return gate_residual(y.view(residual.shape), gate, residual)

    def bf16_matmul_add(a, a_scale, w, w_scale, w_bf16, gate, residual):
        return residual + torch.matmul(a, w_bf16.t())

    sets = [make_set() for _ in range(count)]
    contenders = {"kiln": kiln_op, "kiln + torch epilogue": kiln_then_epilogue}
    if fp8_fp8:
        peer = "torch._scaled_mm + epilogue"
        contenders[peer] = scaled_mm_epilogue
        if bench.cuda:
            contenders[f"torch.compile({peer})"] = compiled(bench, scaled_mm_epilogue)
    else:
        contenders["bf16 matmul + add"] = bf16_matmul_add
    path = select_path(m, sets[0][2], a_dtype=torch.float8_e4m3fn if fp8_fp8 else torch.bfloat16)
    check_peers(bench, contenders, sets[0], CHECK_BOUND, f"kiln bench matmul: {case} {shape}")

    return _record(bench, torch, case, shape, contenders, sets, path, m, k, n, w_bytes,
                   w_bytes if m <= GEMV_MAX_M else moved,
                   floor_bytes=moved if m <= GEMV_MAX_M else None,
                   notes={"format": fmt, "epilogue": case[len(fmt) + 1:]})


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
