"""RoPE: kiln.rope_flux (Flux RoPE + permute, + QK RMSNorm) and kiln.rope (an LLM layer's q/k/v
rotation + KV-cache write) against what Flux and LLM users run today.

Flux shapes: Flux.2 klein at 512², 1024², 1792² (L = 1536, 4608, 13056 tokens), H = 24, D = 128,
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

LLM cases ("llm decode" / "llm prefill"): one attention layer's rope as kiln.llm runs it, three
kiln.rope calls on the Q, K and V slices of the packed bf16 QKV projection [1, T, Hq + 2 Hkv, D]:
Q rotated into a contiguous [1, Hq, T, D], K rotated and V copied into bf16 KV caches
[1, Hkv, S, D] at the tokens' positions (i32 on the device). Llama-3-8B (32 / 8 heads of 128,
adjacent pairs, theta 5e5) and Qwen3-8B (halves, theta 1e6, per-head RMSNorm of Q and K before
the rotation, f32 weights); a decode step (T = 1 at position 4096 + i) and a 512-token prefill
(positions 512 i ..), i the input set (successive sets write successive cache rows). Peers:
  eager          the PyTorch formula in f32: RMSNorm (Qwen3), the rotation of Meta's llama
                 reference (adjacent pairs) or of transformers' rotate_half (halves) with cos / sin
                 [T, D/2] taken from the positions beforehand (in f64, rounded to f32; a model
                 computes them once per forward for every layer), cast to bf16, Q made contiguous
                 [1, Hq, T, D], K and V written with index_copy_ as transformers' StaticCache does
  torch.compile  that function compiled
  copy, bytes floor  as above (x, positions and norm weights read; q and the cache rows written)
The caches are filled with NaN before each contender's checked call; Q and the written cache rows
are compared (BF16_BOUND).
"""

import importlib.metadata
import math

from ... import rope, rope_flux
from ...llm.synthetic import SHAPES as LLM_SHAPES
from ..cases import compiled, eager_and_compiled, measure, run_case
from ..core import relative_error
from ..timing import rotation_count

NAME = "rope"
DESCRIPTION = ("Flux RoPE + permute (+ RMSNorm), LLM rope + KV-cache write vs eager PyTorch, "
               "torch.compile, comfy_kitchen")

# (label, L): Flux.2 klein image tokens (H/16)·(W/16) + 512 text tokens.
GPU_SHAPES = [("512²", 1536), ("1024²", 4608), ("1792²", 13056)]
GPU_HEADS, GPU_HEAD_DIM = 24, 128
CPU_SHAPES = [("small", 256)]
CPU_HEADS, CPU_HEAD_DIM = 4, 64
BATCH = 1
EPS = 1e-6
# (label, rotate, norm)
VARIANTS = [("rope", True, False), ("rope+norm", True, True), ("v-path", False, False)]
# LLM cases: kiln.llm.synthetic's shapes (heads, head dim, theta, style, QK-norm), and
# (phase, T tokens, position of set 0's first token; set i starts T i later).
LLM_MODELS = ("llama-8b", "qwen3-8b")
LLM_PHASES = [("decode", 1, 4096), ("prefill", 512, 0)]
CPU_LLM_MODELS = ("llama-small", "qwen3-small")
CPU_LLM_PHASES = [("decode", 1, 40), ("prefill", 12, 0)]


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


def llm_rotate(x, cos, sin, style: str):
    """x f32 [N, T, H, D] rotated by the angles whose cos and sin (f32 [T, D/2]) are given:
    adjacent pairs (x[2i], x[2i+1]) as Meta's llama reference and llama.cpp's normal rope, or
    halves (x[i], x[i + D/2]) as transformers' rotate_half (Qwen, neox)."""
    import torch

    c, s = cos[:, None], sin[:, None]  # [T, 1, D/2]: broadcast over N and H
    if style == "normal":
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)
    a, b = x.chunk(2, -1)
    return torch.cat([a * c - b * s, a * s + b * c], -1)


def llm_chain(heads: int, kv_heads: int, style: str, eps: float):
    """The PyTorch formula of one LLM layer's rope, as a function of a case's input set:
    Q (normalized, rotated) as a contiguous [N, Hq, T, D], K (normalized, rotated) and V written
    into the caches at the positions with index_copy_ (transformers' StaticCache), math in f32."""
    import torch

    def rotated(x, weight, cos, sin):
        xf = x.float()
        if weight is not None:
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight
        return llm_rotate(xf, cos, sin, style).to(x.dtype).transpose(1, 2)  # [N, H, T, D]

    def chain(qkv, positions, index, cos, sin, q_norm, k_norm, k_cache, v_cache):
        q = rotated(qkv[:, :, :heads], q_norm, cos, sin).contiguous()
        k_cache.index_copy_(2, index, rotated(qkv[:, :, heads:heads + kv_heads], k_norm, cos, sin))
        v_cache.index_copy_(2, index, qkv[:, :, heads + kv_heads:].transpose(1, 2))
        return q

    return chain


def random_pe(torch, length: int, head_dim: int, device):
    """f32 [L, D/2, 2, 2] rotations [[cos, -sin], [sin, cos]] at random angles."""
    angle = torch.rand(length, head_dim // 2, device=device) * (2 * math.pi)
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


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
    shapes, heads, head_dim, models, phases = bench.sizes(
        (GPU_SHAPES, GPU_HEADS, GPU_HEAD_DIM, LLM_MODELS, LLM_PHASES),
        (CPU_SHAPES, CPU_HEADS, CPU_HEAD_DIM, CPU_LLM_MODELS, CPU_LLM_PHASES))
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

    for model in models:
        for phase, tokens, first in phases:
            hp = LLM_SHAPES[model]
            case = f"llm {phase} {model}"
            shape = (f"T{tokens} at {first} Hq{hp.n_head} Hkv{hp.n_head_kv} D{hp.head_dim} "
                     f"{hp.style}{' +qk-norm' if hp.qk_norm else ''}")
            if bench.wants(f"{case} {shape}"):
                _run_llm_case(bench, torch, case, shape, hp, tokens, first)


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
        contenders["torch.compile"] = compiled(bench, eager_chain)
        if rotate:
            contenders["torch.compile BFL"] = compiled(bench, bfl_chain)
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
        err = relative_error(torch, out, reference, "kiln bench rope")
        if not err <= BF16_BOUND:
            message = f"{name} disagrees with kiln on {case} {shape}: relative error {err:.2e}"
            if name == "comfy_kitchen":
                bench.log(f"{message}: peer skipped")
                del contenders[name]
                continue
            raise AssertionError(f"kiln bench rope: {message} > {BF16_BOUND:.2e}")
    del reference

    measure(bench, case, shape, contenders, sets, moved,
            notes={"x_dtype": _short(x_dtype), "out_dtype": "bf16"})
    del sets
    if bench.cuda:
        torch.cuda.empty_cache()


def _run_llm_case(bench, torch, case, shape, hp, tokens, first):
    device = bench.device
    heads, kv_heads, head_dim = hp.n_head, hp.n_head_kv, hp.head_dim
    # One token's bf16 QKV: read once, and written once (q out, the k and v cache rows).
    row = (heads + 2 * kv_heads) * head_dim * 2
    norm_bytes = 2 * head_dim * 4 if hp.qk_norm else 0
    moved = tokens * (2 * row + 4) + norm_bytes  # + the i32 positions
    count = rotation_count(tokens * 2 * row) if bench.cuda else 2
    eps = hp.rms_eps

    def make_sets():
        """Set i: QKV of tokens at positions first + T i .. first + T i + T - 1, their cos / sin,
        the caches every set writes into (rows up to first + T count)."""
        qkv = torch.randn(count, 1, tokens, heads + 2 * kv_heads, head_dim, device=device,
                          dtype=torch.bfloat16)
        positions = first + torch.arange(count * tokens, device=device, dtype=torch.int32)
        positions = positions.reshape(count, 1, tokens)
        inv_freq = hp.rope_theta ** (-torch.arange(0, head_dim, 2, device=device,
                                                   dtype=torch.float64) / head_dim)  # [D/2]
        angle = positions.double()[..., None] * inv_freq  # [count, 1, T, D/2]
        cos, sin = angle.cos().float(), angle.sin().float()
        norms = [(1 + 0.1 * torch.randn(head_dim, device=device)) if hp.qk_norm else None
                 for _ in range(2)]
        caches = [torch.zeros(1, kv_heads, first + count * tokens, head_dim, device=device,
                              dtype=torch.bfloat16) for _ in range(2)]
        # index_copy_'s int64 positions, one tensor a set (aligned as a compiled peer expects)
        return [(qkv[i], positions[i], positions[i, 0].long(), cos[i, 0], sin[i, 0], *norms,
                 *caches) for i in range(count)]

    def kiln_op(qkv, positions, index, cos, sin, q_norm, k_norm, k_cache, v_cache):
        """kiln.llm's three calls (python/kiln/llm/model.py)."""
        q = rope(qkv[:, :, :heads], positions, theta=hp.rope_theta, style=hp.style,
                 norm_weight=q_norm, eps=eps)
        rope(qkv[:, :, heads:heads + kv_heads], positions, theta=hp.rope_theta, style=hp.style,
             norm_weight=k_norm, eps=eps, cache=k_cache)
        rope(qkv[:, :, heads + kv_heads:], positions, theta=None, cache=v_cache)
        return q

    def written_rows(fn, args):
        """Q and the cache rows the call wrote, the caches poisoned with NaN before it."""
        index, k_cache, v_cache = args[2], args[7], args[8]
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
        q = fn(*args)
        return q, k_cache.index_select(2, index), v_cache.index_select(2, index)

    contenders = {"kiln": kiln_op,
                  **eager_and_compiled(bench, llm_chain(heads, kv_heads, hp.style, eps))}
    run_case(bench, case, shape, make_sets, contenders, moved, BF16_BOUND,
             notes={"model": hp.arch, "tokens": tokens, "first_position": first},
             output=written_rows)
