"""Norms: kiln.layer_norm (+ AdaLN, + fp8 out), kiln.rms_norm and kiln.group_norm (+ SiLU)
against what Flux and LLM users run today.

Cases (* the default list; --filter picks among all of them, --all runs them all):
  layer_norm+adaln bf16, fp8   Flux's norm1 / norm2 / single-block norm with its modulation:
        LayerNorm over D without affine (eps 1e-6), then y * (1 + scale) + shift, shift and
        scale [1, D] chunks of the modulation output (strided views, as the blocks take them);
        x bf16 [1, L, D]; out bf16, or e4m3fn with one f32 scale per token (quantize="e4m3fn":
        the input of the next fp8 GEMM). L = 1536, 4608, 13056 tokens (512², 1024², 1792²:
        image tokens + 512 text tokens); D = 3072 (Flux.2 klein 4B, FLUX.1) and 4096 (klein 9B).
        * 1024² D3072 bf16 and fp8.
  rms_norm bf16->bf16, f32->bf16   an LLM's RMSNorm at hidden 4096 (eps 1e-5) over M = 1, 4,
        512, 4096 tokens: x bf16 with a bf16 weight (a bf16 transformers model), or x f32 with an
        f32 weight and a bf16 output (kiln.llm: the f32 residual stream, GGUF's f32 norms).
        * M = 1 f32->bf16 (a decode step), M = 4096 bf16->bf16.
  group_norm+silu nhwc, nchw   the Flux VAE decoder's norm + nonlinearity: GroupNorm(32 groups,
        eps 1e-6, bf16 weight and bias), then SiLU; x bf16 [1, C, H, W] channels-last or NCHW:
        512 @128², 512 @256², 256 @512², 128 @1024². * 128 @1024², both formats.

Peers, timed in the same run on the same inputs after their output was checked against kiln's:
  eager          layer_norm: F.layer_norm, then (1 + scale) * y + shift as diffusers' Flux2 blocks
                 write it, then for fp8 the per-token quantize of torchao's dynamic fp8 recipe
                 (kiln.bench.peers.quantize_rows: amax, scale, saturate, cast); rms_norm:
                 F.rms_norm (then .to(bf16) for an f32 x); group_norm: F.group_norm, then F.silu
  torch.compile  the same function compiled (dynamic=False, fullgraph; compile time excluded)
  copy           a device-to-device copy of the same bytes
  bytes floor    bytes the op must move (x and the vectors read once, out and its scales written
                 once) / this GPU's copy bandwidth; kiln's GroupNorm reads x twice (statistics,
                 then apply): the floor counts one read
Outputs are compared as values (fp8 dequantized with its scales): bf16 peers within a few bf16
roundings of kiln (cases.BF16_BOUND), fp8 within half an e4m3 step in the norm (FP8_BOUND).
Without a GPU: kiln's CPU reference against eager torch at small sizes, CPU times only.
"""

from ... import group_norm, layer_norm, rms_norm
from ..cases import BF16_BOUND, FP8_BOUND, eager_and_compiled, run_case
from ..peers import quantize_rows
from ..timing import rotation_count

NAME = "norm"
DESCRIPTION = "LayerNorm + AdaLN (+ fp8), RMSNorm, GroupNorm + SiLU vs eager PyTorch, torch.compile"

FLUX_EPS = 1e-6  # Flux2TransformerBlock's LayerNorms, the VAE's GroupNorms
LLM_EPS = 1e-5  # Llama-3-8B's rms_norm_eps
GROUPS = 32
# (label, L tokens, D hidden, the outputs of the default list)
LAYER_SHAPES = [
    ("512²", 1536, 3072, ()), ("1024²", 4608, 3072, ("bf16", "fp8")), ("1792²", 13056, 3072, ()),
    ("512²", 1536, 4096, ()), ("1024²", 4608, 4096, ()), ("1792²", 13056, 4096, ()),
]
# (M tokens, D, the x dtypes of the default list)
RMS_SHAPES = [(1, 4096, ("f32",)), (4, 4096, ()), (512, 4096, ()), (4096, 4096, ("bf16",))]
# (label, C, H = W, in the default list)
GROUP_SHAPES = [("512@128²", 512, 128, False), ("512@256²", 512, 256, False),
                ("256@512²", 256, 512, False), ("128@1024²", 128, 1024, True)]
CPU_LAYER_SHAPES = [("small", 40, 256, ("bf16", "fp8"))]
CPU_RMS_SHAPES = [(1, 256, ("bf16", "f32")), (5, 256, ("bf16", "f32"))]
CPU_GROUP_SHAPES = [("64@16²", 64, 16, True)]


def adaln(x, shift, scale):
    """diffusers' Flux2 block: norm1(x) (LayerNorm without affine), then (1 + scale) * y + shift
    with shift and scale [B, D] broadcast over the tokens."""
    import torch

    y = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=FLUX_EPS)
    return (1 + scale[:, None]) * y + shift[:, None]


def adaln_fp8(x, shift, scale):
    """adaln, then the per-token fp8 quantize of torchao's dynamic recipe (the next linear's)."""
    import torch

    return quantize_rows(torch, adaln(x, shift, scale))


def rms(x, weight):
    """F.rms_norm; an f32 x (kiln.llm's residual stream) is cast to bf16 after, as the GEMM after
    it takes bf16."""
    import torch

    y = torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps=LLM_EPS)
    return y.to(torch.bfloat16)


def group_norm_silu(x, weight, bias):
    import torch

    return torch.nn.functional.silu(
        torch.nn.functional.group_norm(x, GROUPS, weight, bias, eps=FLUX_EPS))


def run(bench) -> None:
    torch = bench.require_torch()
    layer_shapes, rms_shapes, group_shapes = bench.sizes(
        (LAYER_SHAPES, RMS_SHAPES, GROUP_SHAPES),
        (CPU_LAYER_SHAPES, CPU_RMS_SHAPES, CPU_GROUP_SHAPES))
    bench.copy_gbps()
    for label, tokens, hidden, defaults in layer_shapes:
        shape = f"{label} L{tokens} D{hidden}"
        for out in ("bf16", "fp8"):
            case = f"layer_norm+adaln {out}"
            if bench.wants(f"{case} {shape}", out in defaults):
                _layer_norm_case(bench, torch, case, shape, tokens, hidden, out == "fp8")
    for tokens, hidden, defaults in rms_shapes:
        shape = f"M{tokens} D{hidden}"
        for x_dtype in ("bf16", "f32"):
            case = f"rms_norm {x_dtype}->bf16"
            if bench.wants(f"{case} {shape}", x_dtype in defaults):
                _rms_norm_case(bench, torch, case, shape, tokens, hidden, x_dtype)
    for label, channels, size, default in group_shapes:
        shape = f"{label} G{GROUPS}"
        for fmt in ("nhwc", "nchw"):
            case = f"group_norm+silu {fmt}"
            if bench.wants(f"{case} {shape}", default):
                _group_norm_case(bench, torch, case, shape, channels, size, fmt)


def _layer_norm_case(bench, torch, case, shape, tokens, hidden, fp8):
    device = bench.device
    x_bytes = tokens * hidden * 2
    out_bytes = tokens * hidden + 4 * tokens if fp8 else tokens * hidden * 2
    moved = x_bytes + 2 * hidden * 2 + out_bytes  # x, shift and scale read; out (+ scales) written
    count = rotation_count(x_bytes + 3 * hidden * 2 + out_bytes) if bench.cuda else 2

    def make_set():
        x = (1 + 2 * torch.randn(1, tokens, hidden, device=device)).to(torch.bfloat16)
        mod = (0.5 * torch.randn(1, 3 * hidden, device=device)).to(torch.bfloat16)
        shift, scale, _gate = mod.reshape(1, 3, hidden).unbind(1)  # [1, D] views, row stride 3D
        return x, shift, scale

    def kiln_op(x, shift, scale):
        return layer_norm(x, shift=shift, scale=scale, eps=FLUX_EPS,
                          quantize="e4m3fn" if fp8 else None)

    contenders = {"kiln": kiln_op, **eager_and_compiled(bench, adaln_fp8 if fp8 else adaln)}
    run_case(bench, case, shape, lambda: [make_set() for _ in range(count)], contenders, moved,
             FP8_BOUND if fp8 else BF16_BOUND, notes={"out": "e4m3fn" if fp8 else "bf16"})


def _rms_norm_case(bench, torch, case, shape, tokens, hidden, x_dtype):
    device = bench.device
    dtype = torch.bfloat16 if x_dtype == "bf16" else torch.float32
    elt = 2 if x_dtype == "bf16" else 4
    moved = tokens * hidden * elt + hidden * elt + tokens * hidden * 2
    count = rotation_count(moved) if bench.cuda else 2

    def make_set():
        x = torch.randn(tokens, hidden, device=device).to(dtype)
        weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
        return x, weight

    def kiln_op(x, weight):
        return rms_norm(x, weight, eps=LLM_EPS, out_dtype=torch.bfloat16)

    contenders = {"kiln": kiln_op, **eager_and_compiled(bench, rms)}
    run_case(bench, case, shape, lambda: [make_set() for _ in range(count)], contenders, moved,
             BF16_BOUND, notes={"x_dtype": x_dtype, "out": "bf16"})


def _group_norm_case(bench, torch, case, shape, channels, size, fmt):
    device = bench.device
    memory = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
    x_bytes = channels * size * size * 2
    moved = 2 * x_bytes + 2 * channels * 2  # x read once, out written, weight and bias read
    count = rotation_count(2 * x_bytes) if bench.cuda else 2

    def make_set():
        x = (0.5 + torch.randn(1, channels, size, size, device=device)).to(torch.bfloat16)
        weight = (1 + 0.1 * torch.randn(channels, device=device)).to(torch.bfloat16)
        bias = (0.1 * torch.randn(channels, device=device)).to(torch.bfloat16)
        return x.contiguous(memory_format=memory), weight, bias

    def kiln_op(x, weight, bias):
        return group_norm(x, GROUPS, weight, bias, eps=FLUX_EPS, silu=True)

    contenders = {"kiln": kiln_op, **eager_and_compiled(bench, group_norm_silu)}
    run_case(bench, case, shape, lambda: [make_set() for _ in range(count)], contenders, moved,
             BF16_BOUND, notes={"format": fmt, "two_pass_bytes": 3 * x_bytes})
