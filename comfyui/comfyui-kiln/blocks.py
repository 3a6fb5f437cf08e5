"""FLUX.1's double- and single-stream blocks on kiln, as ComfyUI block replacements.

ComfyUI's Flux (comfy/ldm/flux/model.py) looks each block up in its model's
transformer_options["patches_replace"]["dit"] under ("double_block", i) / ("single_block", i)
and, where one is there, calls it with the block's inputs (img, txt, vec, pe, attn_mask,
transformer_options) and the original block; ModelPatcher.set_model_patch_replace puts them
there. That is ComfyUI's hook around a whole block: its blocks apply QKNorm before calling
attention, so a hook on attention (attention.py) gets q and k normed already, and none reaches
the norms and GEMMs around it. install() wraps ModelPatcher.__init__ so that every patcher made
for a Flux model (comfy.ldm.flux.model.Flux; any loader: checkpoints, diffusion models, nodes
that load their own) gets kiln's replacement for each of its blocks; clones inherit them with
the patcher's model_options, and another node's replacement for a block takes its place.

A double block on kiln, per stream (text, image):

  block.img_mod(vec)                      ComfyUI's modulation Linear (kiln's GEMV for fp8)
  kiln.layer_norm(x, shift, scale)        LayerNorm + AdaLN modulation (+ fp8 per token when
                                          the QKV linear takes fp8 activations)
  QKV linear                              linear.matmul (fp8 weights) or ComfyUI's Linear
  kiln.rope_flux(q | k, pe, norm_weight)  QK RMSNorm + RoPE + head-major layout, each stream
  kiln.rope_flux(v)                       into its row range of one joint [3, B, H, L, D] input
  kiln.attention                          (ComfyUI's optimized_attention where another node
                                          overrides attention or kiln does not take it)
  out projection                          gate * out + residual in the GEMM's epilogue
  kiln.layer_norm(.., quantize), MLP in   kiln.gelu_tanh (+ fp8 per token), MLP out with gate
                                          and residual in the epilogue

A single block: one norm, linear1 (QKV and the MLP input), the same attention over its one
stream, kiln.gelu_tanh, linear2 over [attention, MLP] with gate and residual in the epilogue.
With bf16 weights (or fp8 ones kiln leaves to ComfyUI) the GEMMs are the layers' own forwards
and the gate and residual one torch.addcmul. Math follows ComfyUI's blocks (layers.py at the
snapshot); kiln rounds once where ComfyUI rounds each step to the model's dtype.

The blocks run under the "attention" part; their fp8 GEMMs under "fp8_linear" (linear.py). A
block call kiln does not take (part turned off, a device kiln does not serve, a pe or input it
does not read, autograd, a kiln error) runs ComfyUI's block, logged once per reason; a block
whose layout is not FLUX.1's (another norm or activation) keeps no replacement.
"""

import torch

import kiln
from kiln.diffusers._linear import Quantized, quantize_rows, token_rows

from . import attention, linear, parts

PART = "attention"
QK_NORM_EPS = 1e-6  # comfy.ldm.flux.layers.RMSNorm's
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_comfy = {}  # ComfyUI's Flux class, its layers and math modules, model_management.cast_to


def install(model_patcher, flux_model, flux_layers, flux_math, management) -> list[str]:
    """Wraps comfy.model_patcher.ModelPatcher.__init__ to give each Flux model's patcher kiln's
    block replacements (modules None where ComfyUI has none); returns the hooks in place."""
    patcher_class = getattr(model_patcher, "ModelPatcher", None)
    name = "Flux blocks (patches_replace 'dit', ModelPatcher.set_model_patch_replace)"
    if (patcher_class is None or not hasattr(patcher_class, "set_model_patch_replace")
            or not hasattr(flux_model, "Flux") or not hasattr(flux_math, "optimized_attention")
            or not hasattr(flux_layers, "DoubleStreamBlock")
            or not hasattr(management, "cast_to")):
        return []
    _comfy.update(flux=flux_model.Flux, layers=flux_layers, math=flux_math,
                  cast_to=management.cast_to)
    parts.call_after_init(patcher_class, add_patches)
    return [name]


def add_patches(patcher) -> int:
    """Sets kiln's replacement for each block of a Flux model's patcher; returns how many."""
    model = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    if type(model) is not _comfy["flux"]:
        return 0
    count = 0
    for kind, blocks, supported, run in (
            ("double_block", model.double_blocks, _double_supported, double),
            ("single_block", model.single_blocks, _single_supported, single)):
        for i, block in enumerate(blocks):
            if supported(block):
                patcher.set_model_patch_replace(_replacement(run, block), "dit", kind, i)
                count += 1
            else:
                parts.declined(PART, f"a Flux {kind} not laid out as FLUX.1's "
                               f"({type(block).__qualname__})")
    return count


def _replacement(run, block):
    """The patches_replace entry for `block`: a plain function (ComfyUI deep-copies
    model_options on every clone; a function is copied as itself)."""

    def kiln_block(args, extra):
        out = run(block, args)
        return extra["original_block"](args) if out is None else out

    kiln_block.kiln_block = True
    return kiln_block


def _plain_norm(norm) -> bool:
    return getattr(norm, "weight", None) is None and getattr(norm, "bias", None) is None


def _gelu_tanh(module) -> bool:
    return isinstance(module, torch.nn.GELU) and module.approximate == "tanh"


def _double_supported(block) -> bool:
    layers = _comfy["layers"]
    mlps = (block.img_mlp, block.txt_mlp)
    return (type(block) is layers.DoubleStreamBlock
            and all(_plain_norm(n) for n in (block.img_norm1, block.img_norm2, block.txt_norm1,
                                             block.txt_norm2))
            and all(len(m) == 3 and _gelu_tanh(m[1]) for m in mlps)
            and block.hidden_size % block.num_heads == 0)


def _single_supported(block) -> bool:
    layers = _comfy["layers"]
    return (type(block) is layers.SingleStreamBlock and _plain_norm(block.pre_norm)
            and _gelu_tanh(block.mlp_act) and block.hidden_size % block.num_heads == 0)


def _problem(streams, vec, pe, head_dim: int) -> str | None:
    """Why kiln does not run a block on these inputs (None: it does)."""
    if not parts.enabled(PART):
        return "turned off"
    first = streams[0]
    if any(x.dim() != 3 or x.dtype != first.dtype or x.shape[0] != first.shape[0]
           for x in streams) or first.dtype not in _FLOATS:
        return f"block inputs {[f'{x.dtype} {list(x.shape)}' for x in streams]}"
    if vec.dim() != 2 or vec.shape[0] != first.shape[0]:
        return f"vec {list(vec.shape)}, expected [B, D]"
    if torch.is_grad_enabled() and any(x.requires_grad for x in (*streams, vec)):
        return "autograd (kiln's ops have no backward)"
    length = sum(x.shape[1] for x in streams)
    return (attention.pe_problem(pe, first.shape[0], length, head_dim)
            or parts.device_problem(*streams, vec))


def _run(block, args, streams, forward):
    heads = block.num_heads
    problem = _problem(streams, args["vec"], args["pe"], block.hidden_size // heads)
    if problem:
        parts.declined(PART, problem)
        return None
    try:
        return forward()
    except (kiln.InvalidArgumentError, kiln.UnsupportedError) as error:
        parts.declined(PART, f"kiln: {error}")
        return None


def double(block, args):
    """A DoubleStreamBlock's replacement: {"img", "txt"}, or None for ComfyUI's block."""
    img, txt = args["img"], args["txt"]

    def forward():
        img_out, txt_out = _double(block, img, txt, args)
        parts.took(PART, f"Flux double block: LayerNorm + AdaLN (kiln.layer_norm), QK RMSNorm + "
                   f"RoPE (kiln.rope_flux), attention, gate + residual epilogues; {img.dtype} on "
                   f"{img.device.type}")
        return {"img": img_out, "txt": txt_out}

    return _run(block, args, (img, txt), forward)


def single(block, args):
    """A SingleStreamBlock's replacement: {"img"}, or None for ComfyUI's block."""
    x = args["img"]

    def forward():
        out = _single(block, x, args)
        parts.took(PART, f"Flux single block: LayerNorm + AdaLN (kiln.layer_norm), QK RMSNorm + "
                   f"RoPE (kiln.rope_flux), attention, GELU (kiln.gelu_tanh), gate + residual "
                   f"epilogue; {x.dtype} on {x.device.type}")
        return {"img": out}

    return _run(block, args, (x,), forward)


def _double(block, img, txt, args):
    img_mod1, img_mod2 = block.img_mod(args["vec"])
    txt_mod1, txt_mod2 = block.txt_mod(args["vec"])
    qkv_img = _linear(block.img_attn.qkv, _norm(block.img_norm1, img, img_mod1,
                                                block.img_attn.qkv), img.dtype)
    qkv_txt = _linear(block.txt_attn.qkv, _norm(block.txt_norm1, txt, txt_mod1,
                                                block.txt_attn.qkv), txt.dtype)
    streams = [(qkv_txt, block.txt_attn.norm), (qkv_img, block.img_attn.norm)]
    lt, li = txt.shape[1], img.shape[1]
    txt_rows, img_rows = (0, lt), (lt, lt + li)
    if block.flipped_img_txt:
        streams.reverse()
        img_rows, txt_rows = (0, li), (li, li + lt)
    attn = joint_attention(streams, block.num_heads, args["pe"], args.get("attn_mask"),
                           args.get("transformer_options") or {})
    projections = (block.img_attn.proj, block.txt_attn.proj)
    if all(linear.quantizes(p, attn) for p in projections):
        attn = quantize_rows(attn)  # once for both streams' projections
    img = _linear(block.img_attn.proj, token_rows(attn, *img_rows), img.dtype,
                  gate=img_mod1.gate, residual=img)
    txt = _linear(block.txt_attn.proj, token_rows(attn, *txt_rows), txt.dtype,
                  gate=txt_mod1.gate, residual=txt)
    img = _mlp(block.img_norm2, block.img_mlp, img, img_mod2)
    txt = _mlp(block.txt_norm2, block.txt_mlp, txt, txt_mod2)
    if txt.dtype == torch.float16:  # as ComfyUI's block
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return img, txt


def _single(block, x, args):
    mod, _ = block.modulation(args["vec"])
    h = _linear(block.linear1, _norm(block.pre_norm, x, mod, block.linear1), x.dtype)
    qkv, mlp = h[..., :3 * block.hidden_size], h[..., 3 * block.hidden_size:]
    attn = joint_attention([(qkv, block.norm)], block.num_heads, args["pe"],
                           args.get("attn_mask"), args.get("transformer_options") or {})
    out = _linear(block.linear2, torch.cat((attn, kiln.gelu_tanh(mlp)), 2), x.dtype,
                  gate=mod.gate, residual=x)
    if out.dtype == torch.float16:
        out = torch.nan_to_num(out, nan=0.0, posinf=65504, neginf=-65504)
    return out


def _norm(norm, x, mod, consumer):
    """LayerNorm + AdaLN modulation of x [B, L, D] (mod: ComfyUI's ModulationOut, [B, 1, D]
    views), quantized per token where `consumer` takes fp8 activations."""
    quantize = linear.ACTIVATION_FORMAT if linear.quantizes(consumer, x) else None
    out = kiln.layer_norm(x, shift=mod.shift[:, 0], scale=mod.scale[:, 0], eps=norm.eps,
                          quantize=quantize)
    return Quantized(*out) if quantize else out


def _mlp(norm, mlp, x, mod):
    h = _linear(mlp[0], _norm(norm, x, mod, mlp[0]), x.dtype)
    quantize = linear.ACTIVATION_FORMAT if linear.quantizes(mlp[2], h) else None
    act = kiln.gelu_tanh(h, quantize=quantize)
    return _linear(mlp[2], Quantized(*act) if quantize else act, x.dtype, gate=mod.gate,
                   residual=x)


def _linear(layer, x, dtype, *, gate=None, residual=None):
    """residual + gate * layer(x) in `dtype` (the block's): gate ComfyUI's [B, 1, N] modulation
    view or None; x [B, L, K] or a Quantized pair (only for an fp8 layer that quantizes() said
    takes it)."""
    if isinstance(x, Quantized) or (linear.is_fp8(layer) and linear.problem(layer, x) is None):
        out = linear.matmul(layer, x, gate=None if gate is None else gate[:, 0],
                            residual=residual, out_dtype=dtype)
        if out is not None:
            return out
    # The layer's own forward: ComfyUI's for bf16 weights; for fp8 ones kiln's Linear, which
    # logs why kiln leaves it to ComfyUI.
    y = layer(x)
    if residual is None:
        return y if gate is None else y * gate
    return residual + y if gate is None else torch.addcmul(residual, y, gate)


def joint_attention(streams, heads: int, pe, mask, transformer_options):
    """Attention over the token streams in sequence order, each (qkv [B, Ls, 3 H D], its
    QKNorm): q and k RMS-normed and rotated, v copied, each written head-major into its row
    range of one [3, B, H, L, D] buffer by kiln.rope_flux; then kiln.attention (ComfyUI's
    optimized_attention where transformer_options overrides attention or kiln does not take
    it). Returns [B, L, H D]."""
    first = streams[0][0]
    b = first.shape[0]
    head_dim = first.shape[-1] // (3 * heads)
    length = sum(qkv.shape[1] for qkv, _ in streams)
    buf = first.new_empty(3, b, heads, length, head_dim)  # (q|k|v, B, H, L, D)
    table = None if pe is None else attention.rope_table(pe)  # [L, ...] or [B, L, ...]
    start = 0
    for qkv, norm in streams:
        rows = slice(start, start + qkv.shape[1])
        x = qkv.unflatten(-1, (3, heads, head_dim))  # [B, Ls, 3, H, D], a view
        rows_pe = None if table is None else (table[rows] if table.dim() == 4 else
                                              table[:, rows])
        for i, rms in ((0, norm.query_norm), (1, norm.key_norm)):
            weight = _comfy["cast_to"](rms.scale, dtype=first.dtype, device=first.device)
            kiln.rope_flux(x[:, :, i], rows_pe, norm_weight=weight, eps=QK_NORM_EPS,
                           out=buf[i][:, :, rows])
        kiln.rope_flux(x[:, :, 2], out=buf[2][:, :, rows])
        start = rows.stop
    q, k, v = buf
    out = None
    if "optimized_attention_override" not in transformer_options:
        out = attention.sdpa(q, k, v, heads, mask, True, False)
    if out is None:
        return _comfy["math"].optimized_attention(q, k, v, heads, skip_reshape=True, mask=mask,
                                                  transformer_options=transformer_options)
    return out
