"""Flux attention on kiln: RoPE fused with the [B, L, H, D] -> [B, H, L, D] layout change
(kiln.rope_flux), then kiln.attention.

ComfyUI's Flux blocks (comfy/ldm/flux/layers.py) call `attention(q, k, v, pe, mask,
transformer_options)` of comfy/ldm/flux/math.py with q, k, v [B, H, L, D] (strided views of the
packed QKV projection, q and k already QK-normed by the block) and pe f32 [B|1, 1, L, D/2, 2, 2];
it rotates q and k in f32 torch ops (a chain of temporaries), then calls optimized_attention
(skip_reshape), which returns [B, L, H * D]. The blocks kiln runs (blocks.py) do their QK-norm,
RoPE and attention themselves; for the blocks that run on ComfyUI (a call kiln's block declines,
another node's block replacement, models built from Flux's blocks) install() rebinds the name
the blocks call, comfy.ldm.flux.layers.attention, to flux_attention:
the same contract, run as two kiln.rope_flux calls (each reads q or k once through its
[B, L, H, D] view and writes [B, H, L, D] in v's dtype, math in f32) and kiln.attention. Anything
kiln does not take goes to the original function, logged once per reason: attention turned off,
a device kiln does not serve, f32 k/v (kiln's attention is f16/bf16), a head dim kiln has no
kernel for, a pe or mask it does not read, arguments of a later ComfyUI it does not know. Where
transformer_options carries an optimized_attention_override (another node's), the RoPE stays on
kiln and the attention goes through ComfyUI's optimized_attention, which applies the override.

ComfyUI versions that route RoPE through comfy-kitchen (comfy_kitchen.apply_rope) reach kiln's
rope through kiln.comfy_kitchen instead, where that rebinding is not there.

install() also registers kiln's attention as "kiln" with ComfyUI's
register_attention_function, for nodes and versions that choose attention by name. sdpa() is
kiln's attention in ComfyUI's convention, which the blocks call too.
"""

import torch

import kiln

from . import parts

PART = "attention"
_KV_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256  # kiln.attention: head dims that are multiples of 8 up to 256


def install(flux_layers, flux_math, attention_module) -> list[str]:
    """Rebinds Flux's attention and registers "kiln" (modules None where ComfyUI has none);
    returns the hooks in place."""
    installed = []
    original = getattr(flux_layers, "attention", None)
    if callable(original) and hasattr(flux_math, "optimized_attention"):
        if not hasattr(original, "kiln_original"):
            flux_layers.attention = _flux_attention(original, flux_math)
        installed.append("comfy.ldm.flux.layers.attention")
    register = getattr(attention_module, "register_attention_function", None)
    if register is not None and hasattr(attention_module, "attention_pytorch"):
        if "kiln" not in getattr(attention_module, "REGISTERED_ATTENTION_FUNCTIONS", {}):
            register("kiln", _registered_attention(attention_module))
        installed.append("attention function 'kiln'")
    return installed


def _flux_attention(original, flux_math):
    def flux_attention(q, k, v, pe, mask=None, transformer_options={}, **kwargs):
        out = None
        if kwargs:
            parts.declined(PART, f"arguments {sorted(kwargs)} this node does not know")
        else:
            out = _flux_on_kiln(q, k, v, pe, mask, transformer_options, flux_math)
        if out is None:
            return original(q, k, v, pe, mask=mask, transformer_options=transformer_options,
                            **kwargs)
        return out

    flux_attention.kiln_original = original
    return flux_attention


def pe_problem(pe, batch: int, length: int, head_dim: int) -> str | None:
    """Why kiln.rope_flux does not read Flux's pe for `length` tokens of `batch` (None: it
    does)."""
    if pe is None:
        return None
    want = (length, head_dim // 2, 2, 2)
    if (pe.dtype != torch.float32 or pe.dim() != 6 or pe.shape[0] not in (1, batch)
            or pe.shape[1] != 1 or tuple(pe.shape[2:]) != want):
        return (f"pe {pe.dtype} {list(pe.shape)}, expected f32 [B|1, 1, {length}, "
                f"{head_dim // 2}, 2, 2]")
    return None


def rope_table(pe):
    """kiln.rope_flux's pe from Flux's [B|1, 1, L, D/2, 2, 2]: [L, ...] or [B, L, ...]."""
    return pe[0, 0] if pe.shape[0] == 1 else pe[:, 0]


def _flux_on_kiln(q, k, v, pe, mask, transformer_options, flux_math):
    if not parts.enabled(PART):
        parts.declined(PART, "turned off")
        return None
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        parts.declined(PART, f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
        return None
    if q.shape[3] % 2:
        parts.declined(PART, f"odd head dim {q.shape[3]}")
        return None
    problem = (pe_problem(pe, q.shape[0], q.shape[2], q.shape[3])
               or parts.device_problem(q, k, v))
    if problem:
        parts.declined(PART, problem)
        return None
    heads = q.shape[1]
    try:
        if pe is not None:
            table = rope_table(pe)
            q = kiln.rope_flux(q.transpose(1, 2), table, out_dtype=v.dtype)  # [B, H, L, D]
            k = kiln.rope_flux(k.transpose(1, 2), table, out_dtype=v.dtype)
    except (kiln.InvalidArgumentError, kiln.UnsupportedError) as error:
        parts.declined(PART, f"kiln.rope_flux: {error}")
        return None
    override = "optimized_attention_override" in transformer_options
    out = None if override else sdpa(q, k, v, heads, mask, True, False)
    if out is None:
        parts.took(PART, "Flux RoPE (kiln.rope_flux); attention by ComfyUI's optimized_attention")
        return flux_math.optimized_attention(q, k, v, heads, skip_reshape=True, mask=mask,
                                             transformer_options=transformer_options)
    parts.took(PART, f"Flux RoPE (kiln.rope_flux) + kiln.attention, {v.dtype} on "
               f"{q.device.type}")
    return out


def sdpa(q, k, v, heads, mask, skip_reshape, skip_output_reshape):
    """kiln.attention in the convention of ComfyUI's attention functions: q, k, v [B, H, L, D]
    (skip_reshape) or [B, L, H * D]; mask additive or bool, 2 to 4 dims; returns [B, H, L, Dv]
    (skip_output_reshape) or [B, L, H * Dv]. None when kiln does not take the call (logged)."""
    if not skip_reshape:
        if q.dim() != 3 or q.shape[-1] % heads or k.shape[-1] % heads:
            parts.declined(PART, f"q {list(q.shape)} for {heads} heads")
            return None
        b = q.shape[0]
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        parts.declined(PART, f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
        return None
    d = q.shape[3]
    if k.dtype not in _KV_DTYPES or v.dtype != k.dtype:
        parts.declined(PART, f"k, v {k.dtype}, {v.dtype} (kiln's attention takes f16 / bf16)")
        return None
    if d % 8 or d > _MAX_HEAD_DIM or v.shape[3] % 8 or v.shape[3] > _MAX_HEAD_DIM:
        parts.declined(PART, f"head dims {d}, {v.shape[3]} (kiln: multiples of 8 up to 256)")
        return None
    problem = parts.device_problem(q, k, v)
    if problem:
        parts.declined(PART, problem)
        return None
    if mask is not None:
        if mask.dim() == 2:  # ComfyUI's convention: [Lq, Lk], then [B, Lq, Lk]
            mask = mask.unsqueeze(0)
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)
    flat = out = None
    if not skip_output_reshape:  # written token-major, [B, L, H * Dv]: no transpose copy
        b, h, length, dv = *q.shape[:3], v.shape[3]
        flat = q.new_empty(b, length, h * dv)
        out = flat.view(b, length, h, dv).transpose(1, 2)
    try:
        out = kiln.attention(q, k, v, mask=mask, out=out)  # [B, H, L, Dv]
    except (kiln.InvalidArgumentError, kiln.UnsupportedError) as error:
        parts.declined(PART, f"kiln.attention: {error}")
        return None
    return out if skip_output_reshape else flat


def _registered_attention(attention_module):
    """kiln's attention as a ComfyUI attention function, ComfyUI's pytorch one for the rest."""
    fallback = attention_module.attention_pytorch

    def attention_kiln(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                       skip_output_reshape=False, **kwargs):
        out = None
        if parts.enabled(PART):
            out = sdpa(q, k, v, heads, mask, skip_reshape, skip_output_reshape)
        if out is None:
            return fallback(q, k, v, heads, mask=mask, attn_precision=attn_precision,
                            skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                            **kwargs)
        parts.took(PART, f"ComfyUI attention function 'kiln', {v.dtype} on {q.device.type}")
        return out

    wrap = getattr(attention_module, "wrap_attn", None)  # honors optimized_attention_override
    return wrap(attention_kiln) if wrap is not None else attention_kiln
