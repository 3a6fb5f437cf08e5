"""Flux RoPE + permute (+ QK RMSNorm): kiln against what Flux users run today.

Shapes: Flux.2 klein at 512², 1024², 1792² (L = 1536, 4608, 13056 tokens), H = 24, D = 128,
N = 1. x is the Q slice of a packed [N, L, 3, H, D] QKV, a strided view, as Flux produces it; the
output is contiguous bf16 [N, H, L, D], as attention takes it. Cases: x bf16 or f32; rotation
alone, with the fused RMSNorm, and the V path (pe None: permute and cast only).

Peers, timed in the same run on the same inputs after their output was checked against kiln's:
  eager          the PyTorch chain of BFL's and ComfyUI's apply_rope (+ their RMSNorm), rotating
                 in [N, L, H, D] order and permuting last
  torch.compile  the same function compiled (dynamic=False; compile time excluded)
  eager BFL      the chain in BFL's order, as ANCHORS.md times it: permute to [N, H, L, D]
                 first (a strided view), then norm and rotate, then make it contiguous
  torch.compile BFL  that function compiled
  comfy_kitchen  comfy_kitchen.apply_rope1, and rms_rope1 with the norm, when importable
  copy           a device-to-device copy moving the same bytes (half read, half written): what
                 any kernel of this size can reach, ramp-up and tail included
  bytes floor    bytes the op must move / this GPU's copy bandwidth on a 2 GiB copy
"""

import importlib.metadata
import math

from ... import rope_flux
from ..core import Measurement
from ..timing import rotation_count

NAME = "rope"
DESCRIPTION = "Flux RoPE + permute (+ RMSNorm) vs eager PyTorch, torch.compile, comfy_kitchen"

# (label, L): Flux.2 klein image tokens (H/16)·(W/16) + 512 text tokens.
GPU_SHAPES = [("512²", 1536), ("1024²", 4608), ("1792²", 13056)]
GPU_HEADS, GPU_HEAD_DIM = 24, 128
CPU_SHAPES = [("small", 256)]
CPU_HEADS, CPU_HEAD_DIM = 4, 64
BATCH = 1
EPS = 1e-6
# (label, rotate, norm)
VARIANTS = [("rope", True, False), ("rope+norm", True, True), ("v-path", False, False)]


def eager_chain(x, pe, norm_weight, eps: float):
    """What BFL's and ComfyUI's Flux code runs: RMSNorm in f32, apply_rope with pe broadcast
    over heads, then the permute to [N, H, L, D] that attention needs, cast to bf16."""
    import torch

    if pe is None:
        return x.permute(0, 2, 1, 3).to(torch.bfloat16).contiguous()  # one copy kernel
    xf = x.float()
    if norm_weight is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    xq = xf.reshape(*xf.shape[:-1], -1, 1, 2)  # [N, L, H, D/2, 1, 2]
    pe_h = pe.unsqueeze(-4)  # [(N,) L, 1, D/2, 2, 2]
    out = pe_h[..., 0] * xq[..., 0] + pe_h[..., 1] * xq[..., 1]  # [N, L, H, D/2, 2]
    return out.reshape(x.shape).permute(0, 2, 1, 3).contiguous().to(torch.bfloat16)


def bfl_chain(x, pe, norm_weight, eps: float):
    """The same math in the order of BFL's Flux code and ANCHORS.md's anchor: q/k are permuted
    to [N, H, L, D] views first, normalized and rotated there, and made contiguous last."""
    import torch

    xh = x.permute(0, 2, 1, 3)  # [N, H, L, D], strided
    xf = xh.float()
    if norm_weight is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    xq = xf.reshape(*xf.shape[:-1], -1, 1, 2)  # [N, H, L, D/2, 1, 2]
    pe_h = pe.unsqueeze(-5) if pe.dim() == 5 else pe[None, None]  # [N|1, 1, L, D/2, 2, 2]
    out = pe_h[..., 0] * xq[..., 0] + pe_h[..., 1] * xq[..., 1]
    return out.reshape(*xh.shape).to(torch.bfloat16).contiguous()


def random_pe(torch, length: int, head_dim: int, device):
    """f32 [L, D/2, 2, 2] rotations [[cos, -sin], [sin, cos]] at random angles."""
    angle = torch.rand(length, head_dim // 2, device=device) * (2 * math.pi)
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def relative_error(torch, got, want) -> float:
    """||got - want|| / ||want|| in f64; fails loudly on a zero reference."""
    want64 = want.double()
    norm = want64.norm().item()
    if not norm > 0:
        raise AssertionError("kiln bench rope: reference output is all zeros")
    return ((got.double() - want64).norm() / norm).item()


# bf16 output: both sides round an f32 result to bf16, so they differ by at most one bf16 ulp
# (2^-8 relative) where their f32 values straddle a rounding boundary.
BF16_BOUND = 2.0**-8


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown: no package metadata)"


def _comfy_kitchen():
    try:
        import comfy_kitchen
    except ImportError:
        return None, "comfy_kitchen not installed: peer skipped"
    return comfy_kitchen, None


def run(bench) -> None:
    torch = bench.require_torch()
    if bench.cuda:
        shapes, heads, head_dim = GPU_SHAPES, GPU_HEADS, GPU_HEAD_DIM
    else:
        bench.log("no CUDA device: CPU backends at small sizes")
        shapes, heads, head_dim = CPU_SHAPES, CPU_HEADS, CPU_HEAD_DIM
    device = bench.device
    bench.copy_gbps()

    ck, ck_why = _comfy_kitchen() if bench.cuda else (None, None)
    if ck_why:
        bench.log(ck_why)
    elif ck is not None:
        bench.log(f"comfy_kitchen {_version('comfy-kitchen')}: apply_rope1, rms_rope1")

    def comfy_kitchen_chain(x, pe, norm_weight, eps):
        """ComfyUI's Flux path through comfy_kitchen: q/k as [N, H, L, D] views, pe as
        [N|1, 1, L, D/2, 2, 2]; rms_rope1 fuses the norm, apply_rope1 rotates alone."""
        xh = x.permute(0, 2, 1, 3)
        freqs = pe.unsqueeze(1) if pe.dim() == 5 else pe[None, None]
        if norm_weight is not None:
            out = ck.rms_rope1(xh, freqs, norm_weight.to(x.dtype), eps)
        else:
            out = ck.apply_rope1(xh, freqs)
        return out.to(torch.bfloat16).contiguous()

    for label, length in shapes:
        shape = f"{label} L{length} H{heads} D{head_dim}"
        for x_dtype in (torch.bfloat16, torch.float32):
            for variant, rotate, norm in VARIANTS:
                case = f"{variant} {_short(x_dtype)}->bf16"
                if not bench.wants(f"{case} {shape}"):
                    continue
                ck_peer = comfy_kitchen_chain if ck is not None and rotate else None
                _run_case(bench, torch, device, case, shape, length, heads, head_dim, x_dtype,
                          rotate, norm, ck_peer)


def _short(dtype) -> str:
    return {"torch.bfloat16": "bf16", "torch.float32": "f32"}[str(dtype)]


def _run_case(bench, torch, device, case, shape, length, heads, head_dim, x_dtype, rotate, norm,
              comfy_kitchen_chain):
    n, elt = BATCH, torch.tensor([], dtype=x_dtype).element_size()
    x_bytes = n * length * heads * head_dim * elt
    pe_bytes = length * head_dim * 2 * 4 if rotate else 0
    w_bytes = head_dim * 2 if norm else 0
    out_bytes = n * heads * length * head_dim * 2
    moved = x_bytes + pe_bytes + w_bytes + out_bytes
    # A set holds the packed qkv, pe and the output kept alive until the set comes round again.
    count = rotation_count(3 * x_bytes + pe_bytes + out_bytes) if bench.cuda else 2

    def make_set():
        qkv = torch.randn(n, length, 3, heads, head_dim, dtype=x_dtype, device=device)
        pe = random_pe(torch, length, head_dim, device) if rotate else None
        w = (1 + 0.25 * torch.randn(head_dim, device=device)).to(torch.bfloat16) if norm else None
        return qkv[:, :, 0], pe, w, EPS  # x: [N, L, H, D] view of qkv, strides (3HD·L, 3HD, D, 1)

    sets = [make_set() for _ in range(count)]

    def kiln_op(x, pe, w, eps):
        return rope_flux(x, pe, norm_weight=w, eps=eps, out_dtype=torch.bfloat16)

    contenders = {"kiln": kiln_op, "eager": eager_chain}
    if rotate:
        contenders["eager BFL"] = bfl_chain
    if bench.cuda:
        torch.compiler.reset()
        contenders["torch.compile"] = torch.compile(eager_chain, dynamic=False, fullgraph=True)
        if rotate:
            contenders["torch.compile BFL"] = torch.compile(bfl_chain, dynamic=False, fullgraph=True)
    if comfy_kitchen_chain:
        contenders["comfy_kitchen"] = comfy_kitchen_chain

    reference = kiln_op(*sets[0])
    for name, fn in list(contenders.items())[1:]:
        try:
            out = fn(*sets[0])  # compiles torch.compile here
        except Exception as error:  # a peer that cannot take this case is skipped, not fatal
            if name != "comfy_kitchen":
                raise
            bench.log(f"comfy_kitchen failed on {case} {shape}: {error}: peer skipped")
            del contenders[name]
            continue
        if out.shape != reference.shape or not out.is_contiguous():
            raise AssertionError(
                f"kiln bench rope: {name} gave shape {list(out.shape)} with strides "
                f"{out.stride()} on {case} {shape}, expected contiguous {list(reference.shape)}"
            )
        err = relative_error(torch, out, reference)
        if err > BF16_BOUND:
            message = f"{name} disagrees with kiln on {case} {shape}: relative error {err:.2e}"
            if name == "comfy_kitchen":
                bench.log(f"{message}: peer skipped")
                del contenders[name]
                continue
            raise AssertionError(f"kiln bench rope: {message} > {BF16_BOUND:.2e}")
    del reference

    timings = {name: bench.timer.time(fn, sets) for name, fn in contenders.items()}
    if bench.cuda:
        half = moved // 2
        copies = [
            (torch.empty(half, dtype=torch.uint8, device=device).random_(0, 255),
             torch.empty(half, dtype=torch.uint8, device=device))
            for _ in range(count)
        ]
        timings["copy"] = bench.timer.time(lambda src, dst: dst.copy_(src), copies)
        del copies
    kiln = timings.pop("kiln")
    peers = {name: t.ms for name, t in timings.items()}
    peers["bytes floor"] = moved / bench.copy_gbps() / 1e6
    bench.add(Measurement(
        case=case,
        shape=shape,
        kiln_ms=kiln.ms,
        bytes=moved,
        peers=peers,
        host_us={"kiln": kiln.host_us, **{name: t.host_us for name, t in timings.items()}},
        notes={"rotation_sets": count, "x_dtype": _short(x_dtype), "out_dtype": "bf16"},
    ))
    del sets
    if bench.cuda:
        torch.cuda.empty_cache()
