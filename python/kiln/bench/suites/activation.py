"""MLP activations: kiln.glu (SwiGLU) and kiln.gelu_tanh, with a bf16 or a fused per-token fp8
output, against what Flux and LLM users run today.

Cases (* the default list; --filter picks among all of them, --all runs them all):
  swiglu       y = silu(x[..., :F]) * x[..., F:], x bf16 [M, 2F] (the gate/up projection's output,
               gate half first: Flux.2's Flux2SwiGLU, an LLM's silu(gate) * up with the two
               weights concatenated):
                 Flux.2 klein at 1024²: M = 4608 tokens, F = 9216 (MLP ratio 3 of 3072)
                 LLM: F = 14336 (Llama-3-8B), 12288 (Qwen3-8B) at M = 1, 4, 512, 4096
  gelu_tanh    y = GELU(x, tanh approximation), FLUX.1's MLP at 1024²: x bf16 [4608, 12288]
  each with out bf16, or e4m3fn with one f32 scale per token (quantize="e4m3fn": the input of
  the MLP's fp8 down projection).
  * swiglu flux.2 bf16 and fp8; gelu_tanh flux.1 fp8; swiglu llama-8b M = 1 bf16.

Peers, timed in the same run on the same inputs after their output was checked against kiln's:
  eager          F.silu(x[..., :F]) * x[..., F:] (diffusers' Flux2SwiGLU) or
                 F.gelu(x, approximate="tanh"), in bf16, then for fp8 the per-token quantize of
                 torchao's dynamic fp8 recipe (kiln.bench.peers.quantize_rows)
  torch.compile  the same function compiled (dynamic=False, fullgraph; compile time excluded)
  copy           a device-to-device copy of the same bytes
  bytes floor    x read once, y (+ its scales) written once / this GPU's copy bandwidth
Outputs are compared as values (fp8 dequantized): bf16 within a few bf16 roundings of kiln
(cases.BF16_BOUND), fp8 within half an e4m3 step in the norm (FP8_BOUND).
Without a GPU: kiln's CPU reference against eager torch at small sizes, CPU times only.
"""

from ... import gelu_tanh, glu
from ..cases import BF16_BOUND, FP8_BOUND, eager_and_compiled, run_case
from ..peers import quantize_rows
from ..timing import rotation_count

NAME = "activation"
DESCRIPTION = "SwiGLU and GELU-tanh (bf16 or fp8 out) vs eager PyTorch, torch.compile"

# (activation, label, M, F, the outputs of the default list)
GPU_SHAPES = [
    ("swiglu", "flux.2 1024²", 4608, 9216, ("bf16", "fp8")),
    ("gelu_tanh", "flux.1 1024²", 4608, 12288, ("fp8",)),
    *[("swiglu", "llama-8b", m, 14336, ("bf16",) if m == 1 else ()) for m in (1, 4, 512, 4096)],
    *[("swiglu", "qwen3-8b", m, 12288, ()) for m in (1, 4, 512, 4096)],
]
CPU_SHAPES = [("swiglu", "small", 1, 352, ("bf16", "fp8")),
              ("swiglu", "small", 24, 352, ("bf16", "fp8")),
              ("gelu_tanh", "small", 24, 384, ("bf16", "fp8"))]


def swiglu(x):
    """diffusers' Flux2SwiGLU: silu of the first half times the second half."""
    import torch

    half = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :half]) * x[..., half:]


def swiglu_fp8(x):
    import torch

    return quantize_rows(torch, swiglu(x))


def gelu(x):
    """FLUX.1's FeedForward activation (diffusers' GELU(approximate="tanh"))."""
    import torch

    return torch.nn.functional.gelu(x, approximate="tanh")


def gelu_fp8(x):
    import torch

    return quantize_rows(torch, gelu(x))


PEERS = {("swiglu", False): swiglu, ("swiglu", True): swiglu_fp8,
         ("gelu_tanh", False): gelu, ("gelu_tanh", True): gelu_fp8}


def run(bench) -> None:
    torch = bench.require_torch()
    shapes = bench.sizes(GPU_SHAPES, CPU_SHAPES)
    bench.copy_gbps()
    for activation, label, rows, width, defaults in shapes:
        shape = f"{label} M{rows} F{width}"
        for out in ("bf16", "fp8"):
            case = f"{activation} {out}"
            if bench.wants(f"{case} {shape}", out in defaults):
                _run_case(bench, torch, case, shape, activation, rows, width, out == "fp8")


def _run_case(bench, torch, case, shape, activation, rows, width, fp8):
    device = bench.device
    in_width = 2 * width if activation == "swiglu" else width
    x_bytes = rows * in_width * 2
    out_bytes = rows * width + 4 * rows if fp8 else rows * width * 2
    moved = x_bytes + out_bytes
    count = rotation_count(moved) if bench.cuda else 2

    def make_set():
        return (2 * torch.randn(rows, in_width, device=device)).to(torch.bfloat16),

    if activation == "swiglu":
        def kiln_op(x):
            return glu(x, activation="silu", quantize="e4m3fn" if fp8 else None)
    else:
        def kiln_op(x):
            return gelu_tanh(x, quantize="e4m3fn" if fp8 else None)

    contenders = {"kiln": kiln_op, **eager_and_compiled(bench, PEERS[(activation, fp8)])}
    run_case(bench, case, shape, lambda: [make_set() for _ in range(count)], contenders, moved,
             FP8_BOUND if fp8 else BF16_BOUND, notes={"out": "e4m3fn" if fp8 else "bf16"})
