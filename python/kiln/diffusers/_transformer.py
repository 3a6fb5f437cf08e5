"""Flux.2 (Flux2Transformer2DModel) and FLUX.1 (FluxTransformer2DModel) transformer blocks on
kiln, as forwards that replace each block's forward and read the block's own weights.

A double-stream block, per stream (text and image), with fp8 activations:

  kiln.layer_norm(x, shift, scale, quantize)   LayerNorm + AdaLN modulation + fp8 per token
  QKV linear                                   one fp8 x fp8 GEMM over Q, K and V fused at apply
  kiln.rope_flux(q | k, pe, norm_weight, out=) QK RMSNorm + RoPE + head-major layout, written
  kiln.rope_flux(v, out=)                      straight into its row range of one joint
                                               [B, H, L_txt + L_img, D] input: no concatenation
  kiln.attention                               joint text + image attention
  quantize per token, out projection           gate * out + residual in the GEMM's epilogue
  kiln.layer_norm(.., quantize), MLP in        fp8 x fp8
  kiln.glu (SwiGLU) / kiln.gelu_tanh (FLUX.1)  with the quantization for the next GEMM
  MLP out                                      gate and residual in the epilogue

A single-stream block runs one norm, one GEMM for QKV and the MLP input together, the same
attention, the activation, and the output projection as two GEMMs over its attention and MLP
column ranges (kiln.diffusers._linear.SplitLinear), so that [attention, MLP] is never
concatenated. With weights="bf16" the GEMMs are cuBLAS (F.linear) and the rest is the same.

The blocks mirror diffusers 0.42.1's transformer_flux2.py / transformer_flux.py forwards (same
arguments, same results up to rounding); the model's own forward still runs around them (time
and guidance embedding, RoPE tables, the concatenation before the single-stream blocks).
"""

import weakref

import torch
import torch.nn.functional as F

import kiln

from .._C import UnsupportedError
from . import _linear
from ._linear import Mode, Originals, Quantized, quantize_rows, token_rows

# The model-level linears outside the blocks that take one row per token; the others outside
# the blocks (time, guidance and pooled-text embedders, AdaLN modulation, norm_out's
# projection) take one row per batch element.
TOKEN_LINEARS = ("x_embedder", "context_embedder", "proj_out")
# Prefixes of the modules outside the blocks that each family has (a Linear elsewhere means an
# adapter or a model kiln does not know).
KNOWN_TOP_LEVEL = {
    "Flux2Transformer2DModel": ("time_guidance_embed.", "double_stream_modulation_img.",
                                "double_stream_modulation_txt.", "single_stream_modulation.",
                                "norm_out.", *TOKEN_LINEARS),
    "FluxTransformer2DModel": ("time_text_embed.", "norm_out.", *TOKEN_LINEARS),
}


def _fused(result):
    """A fused op's result: a (q, scale) pair with quantize=, else the plain output."""
    return Quantized(*result) if isinstance(result, tuple) else result


def modulation(mod: torch.Tensor, parts: int):
    """`parts` [B, D] vectors from an AdaLN projection [B, parts * D] (or [B, 1, ..]), in
    diffusers' chunk order: views with strided rows, which kiln.layer_norm's shift / scale and
    kiln.matmul's gate read as they are."""
    return mod.reshape(mod.shape[0], parts, -1).unbind(1)


class RotaryTable:
    """kiln.rope_flux's pe, f32 [L, D/2, 2, 2] = [[cos, -sin], [sin, cos]] per pair, from
    diffusers' (cos, sin) [L, D] tables (each frequency repeated for the two elements of its
    pair); built once per forward (the model builds one (cos, sin) per forward and hands the same
    tensors to every block) and shared by every block."""

    def __init__(self):
        self._source = None
        self._pe = None

    def __call__(self, rotary):
        if rotary is None:
            return None
        cos, sin = rotary
        if self._source is not None and self._source() is cos:
            return self._pe
        c, s = cos[:, 0::2].float(), sin[:, 0::2].float()  # [L, D/2]
        pe = torch.stack([c, -s, s, c], dim=-1).unflatten(-1, (2, 2))
        self._source, self._pe = weakref.ref(cos), pe
        return pe


class QkNorm:
    """A torch.nn.RMSNorm over the head dim as kiln.rope_flux takes it (weight, eps)."""

    def __init__(self, norm: torch.nn.RMSNorm, head_dim: int, dtype):
        self.weight = norm.weight if norm.weight is not None else torch.ones(
            head_dim, dtype=dtype, device=_device_of(norm))
        self.eps = norm.eps if norm.eps is not None else torch.finfo(dtype).eps


def _device_of(module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def joint_attention(streams, heads: int, head_dim: int, pe):
    """Attention over the token streams in sequence order (text first), each given as (qkv
    [B, Ls, 3 H D] from its projection, its Q norm, its K norm). Q, K and V of every stream are
    normalized, rotated and written head-major into their row range of one [3, B, H, L, D]
    buffer by kiln.rope_flux; returns the attention output [B, L, H D] (tokens in stream
    order)."""
    first = streams[0][0]
    b = first.shape[0]
    length = sum(qkv.shape[1] for qkv, _, _ in streams)
    buf = first.new_empty(3, b, heads, length, head_dim)  # (q|k|v, B, H, L, D)
    start = 0
    for qkv, norm_q, norm_k in streams:
        rows = slice(start, start + qkv.shape[1])
        x = qkv.unflatten(-1, (3, heads, head_dim))  # [B, Ls, 3, H, D], a view
        stream_pe = None if pe is None else pe[rows]
        kiln.rope_flux(x[:, :, 0], stream_pe, norm_weight=norm_q.weight, eps=norm_q.eps,
                      out=buf[0][:, :, rows])
        kiln.rope_flux(x[:, :, 1], stream_pe, norm_weight=norm_k.weight, eps=norm_k.eps,
                      out=buf[1][:, :, rows])
        kiln.rope_flux(x[:, :, 2], out=buf[2][:, :, rows])
        start = rows.stop
    # Written token-major, as the output projection reads it: no transpose copy.
    out = first.new_empty(b, length, heads * head_dim)
    kiln.attention(buf[0], buf[1], buf[2],
                   out=out.view(b, length, heads, head_dim).transpose(1, 2))
    return out


def _joined(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """torch.cat([first, second], dim=1), as a view when `second` follows `first` in memory
    (the two halves of the previous single-stream block's output): FLUX.1 hands the text and
    image streams to every single-stream block apart and joins them in each."""
    if (first.dim() == 3 and second.dim() == 3 and first.dtype == second.dtype
            and first.device == second.device and first.stride() == second.stride()
            and first.shape[0] == second.shape[0] and first.shape[2] == second.shape[2]
            and first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
            and second.storage_offset()
            == first.storage_offset() + first.shape[1] * first.stride(1)):
        shape = (first.shape[0], first.shape[1] + second.shape[1], first.shape[2])
        return first.as_strided(shape, first.stride(), first.storage_offset())
    return torch.cat([first, second], dim=1)


def _no_attention_kwargs(block: str, joint_attention_kwargs) -> None:
    if joint_attention_kwargs:
        raise UnsupportedError(
            f"kiln.diffusers: {block} got joint_attention_kwargs "
            f"{sorted(joint_attention_kwargs)}: kiln's blocks take none (IP-adapter inputs and "
            "KV caches of reference images run on diffusers: call handle.remove() first)")


def _clip_f16(x: torch.Tensor) -> torch.Tensor:
    # What diffusers does to an f16 residual stream.
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class _Block:
    """What every kiln block holds: the mode, the shared pe table, the attention geometry and the
    model's context-parallel state (kiln.diffusers._parallel.ContextParallel: one joint attention
    on one GPU, Ulysses / ring attention across ranks under diffusers' context parallelism)."""

    def __init__(self, attn, mode: Mode, rotary: RotaryTable, parallel):
        self.mode = mode
        self.rotary = rotary
        self.parallel = parallel
        self.heads = attn.heads
        self.head_dim = attn.head_dim
        self.inner = attn.heads * attn.head_dim

    def layer_norm(self, x, shift, scale, eps):
        return _fused(kiln.layer_norm(x, shift=shift, scale=scale, eps=eps,
                                     quantize=self.mode.quantize))

    def activation(self, h, kind: str):
        if kind == "silu":
            return _fused(kiln.glu(h, activation="silu", quantize=self.mode.quantize))
        return _fused(kiln.gelu_tanh(h, quantize=self.mode.quantize))

    def attention_output(self, attn):
        """The attention output as the out projection reads it (quantized with fp8
        activations)."""
        return quantize_rows(attn) if self.mode.quantize is not None else attn

    def mlp(self, x, shift, scale, gate, eps, linear_in, linear_out, kind):
        h = linear_in(self.layer_norm(x, shift, scale, eps))
        return linear_out(self.activation(h, kind), gate=gate, residual=x)


class DoubleBlock(_Block):
    """A double-stream block (Flux2TransformerBlock or FluxTransformerBlock): text and image
    streams with their own weights and one joint attention."""

    def __init__(self, block, mode: Mode, rotary: RotaryTable, originals: Originals,
                 offload: bool, parallel, flux2: bool):
        attn = block.attn
        super().__init__(attn, mode, rotary, parallel)
        dtype = attn.to_q.weight.dtype
        link = dict(mode=mode, originals=originals, offload=offload)
        self.qkv_img = _linear.fused([attn.to_q, attn.to_k, attn.to_v], **link)
        self.qkv_txt = _linear.fused([attn.add_q_proj, attn.add_k_proj, attn.add_v_proj], **link)
        self.out_img = _linear.single(attn.to_out[0], **link)
        self.out_txt = _linear.single(attn.to_add_out, **link)
        self.norms_img = (QkNorm(attn.norm_q, self.head_dim, dtype),
                          QkNorm(attn.norm_k, self.head_dim, dtype))
        self.norms_txt = (QkNorm(attn.norm_added_q, self.head_dim, dtype),
                          QkNorm(attn.norm_added_k, self.head_dim, dtype))
        if flux2:
            self.kind = "silu"
            ff, ffc = block.ff, block.ff_context
            self.ff = (_linear.single(ff.linear_in, **link), _linear.single(ff.linear_out, **link))
            self.ffc = (_linear.single(ffc.linear_in, **link),
                        _linear.single(ffc.linear_out, **link))
            self.eps_msa = (block.norm1.eps, block.norm1_context.eps)
            self.ada = None
        else:
            self.kind = "gelu_tanh"
            ff, ffc = block.ff.net, block.ff_context.net
            self.ff = (_linear.single(ff[0].proj, **link), _linear.single(ff[2], **link))
            self.ffc = (_linear.single(ffc[0].proj, **link), _linear.single(ffc[2], **link))
            self.eps_msa = (block.norm1.norm.eps, block.norm1_context.norm.eps)
            self.ada = (_linear.single(block.norm1.linear, per_batch=True, **link),
                        _linear.single(block.norm1_context.linear, per_batch=True, **link))
        self.eps_mlp = (block.norm2.eps, block.norm2_context.eps)
        self.name = type(block).__name__

    def _mods(self, args):
        """(image, text) modulations, 6 [B, D] vectors each: shift, scale, gate of the attention
        and of the MLP."""
        if self.ada is None:  # Flux.2: the model computes both, shared by every block
            return modulation(args[0], 6), modulation(args[1], 6)
        t = F.silu(args[0])  # FLUX.1: each block projects silu(temb) itself
        return modulation(self.ada[0](t), 6), modulation(self.ada[1](t), 6)

    def _forward(self, hidden_states, encoder_hidden_states, mods, image_rotary_emb,
                 joint_attention_kwargs):
        _no_attention_kwargs(self.name, joint_attention_kwargs)
        hs, ehs = hidden_states, encoder_hidden_states
        l_txt, l_img = ehs.shape[1], hs.shape[1]
        (shift, scale, gate, shift_mlp, scale_mlp, gate_mlp), (
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self._mods(mods)
        x_txt = self.layer_norm(ehs, c_shift, c_scale, self.eps_msa[1])
        x_img = self.layer_norm(hs, shift, scale, self.eps_msa[0])
        attn = self.parallel.attention([(self.qkv_txt(x_txt), *self.norms_txt),
                                        (self.qkv_img(x_img), *self.norms_img)],
                                       self.heads, self.head_dim, self.rotary(image_rotary_emb))
        attn = self.attention_output(attn)
        hs = self.out_img(token_rows(attn, l_txt, l_txt + l_img), gate=gate, residual=hs)
        ehs = self.out_txt(token_rows(attn, 0, l_txt), gate=c_gate, residual=ehs)
        hs = self.mlp(hs, shift_mlp, scale_mlp, gate_mlp, self.eps_mlp[0], *self.ff, self.kind)
        ehs = self.mlp(ehs, c_shift_mlp, c_scale_mlp, c_gate_mlp, self.eps_mlp[1], *self.ffc,
                       self.kind)
        return _clip_f16(ehs), hs


class Flux2DoubleBlock(DoubleBlock):
    def __init__(self, block, mode, rotary, originals, offload, parallel):
        super().__init__(block, mode, rotary, originals, offload, parallel, flux2=True)

    def forward(self, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt,
                image_rotary_emb=None, joint_attention_kwargs=None):
        """Flux2TransformerBlock.forward on kiln: returns (encoder_hidden_states,
        hidden_states)."""
        return self._forward(hidden_states, encoder_hidden_states, (temb_mod_img, temb_mod_txt),
                             image_rotary_emb, joint_attention_kwargs)


class FluxDoubleBlock(DoubleBlock):
    def __init__(self, block, mode, rotary, originals, offload, parallel):
        super().__init__(block, mode, rotary, originals, offload, parallel, flux2=False)

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                joint_attention_kwargs=None):
        """FluxTransformerBlock.forward on kiln: returns (encoder_hidden_states,
        hidden_states)."""
        return self._forward(hidden_states, encoder_hidden_states, (temb,), image_rotary_emb,
                             joint_attention_kwargs)


class SingleBlock(_Block):
    """A single-stream block over the joint text + image sequence: one GEMM for Q, K, V and the
    MLP's input, attention and the activation side by side, the output projection split over
    their column ranges."""

    def __init__(self, block, mode, rotary, originals, offload, parallel, flux2: bool):
        attn = block.attn
        super().__init__(attn, mode, rotary, parallel)
        dtype = attn.norm_q.weight.dtype if attn.norm_q.weight is not None else torch.bfloat16
        link = dict(mode=mode, originals=originals, offload=offload)
        self.norms = (QkNorm(attn.norm_q, self.head_dim, dtype),
                      QkNorm(attn.norm_k, self.head_dim, dtype))
        if flux2:
            self.kind = "silu"
            self.qkv_mlp = _linear.single(attn.to_qkv_mlp_proj, **link)
            self.out = _linear.split(attn.to_out, self.inner, **link)
            self.eps = block.norm.eps
            self.ada = None
        else:
            self.kind = "gelu_tanh"
            self.qkv_mlp = _linear.fused([attn.to_q, attn.to_k, attn.to_v], extra=[block.proj_mlp],
                                         **link)
            self.out = _linear.split(block.proj_out, self.inner, **link)
            self.eps = block.norm.norm.eps
            self.ada = _linear.single(block.norm.linear, per_batch=True, **link)
        self.name = type(block).__name__

    def _joint(self, joint, mod, image_rotary_emb, joint_attention_kwargs):
        """The block over the joint [B, L, D] sequence; returns the new joint sequence."""
        _no_attention_kwargs(self.name, joint_attention_kwargs)
        if self.ada is not None:
            mod = self.ada(F.silu(mod))
        shift, scale, gate = modulation(mod, 3)
        projected = self.qkv_mlp(self.layer_norm(joint, shift, scale, self.eps))
        qkv, mlp_in = projected[..., :3 * self.inner], projected[..., 3 * self.inner:]
        attn = self.parallel.attention([(qkv, *self.norms)], self.heads, self.head_dim,
                                       self.rotary(image_rotary_emb))
        mlp = self.activation(mlp_in, self.kind)
        return _clip_f16(self.out(self.attention_output(attn), mlp, gate=gate, residual=joint))


class Flux2SingleBlock(SingleBlock):
    def __init__(self, block, mode, rotary, originals, offload, parallel):
        super().__init__(block, mode, rotary, originals, offload, parallel, flux2=True)

    def forward(self, hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb=None,
                joint_attention_kwargs=None, split_hidden_states=False, text_seq_len=None):
        """Flux2SingleTransformerBlock.forward on kiln."""
        if encoder_hidden_states is not None:
            text_seq_len = encoder_hidden_states.shape[1]
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        out = self._joint(hidden_states, temb_mod, image_rotary_emb, joint_attention_kwargs)
        if split_hidden_states:
            return out[:, :text_seq_len], out[:, text_seq_len:]
        return out


class FluxSingleBlock(SingleBlock):
    def __init__(self, block, mode, rotary, originals, offload, parallel):
        super().__init__(block, mode, rotary, originals, offload, parallel, flux2=False)

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                joint_attention_kwargs=None):
        """FluxSingleTransformerBlock.forward on kiln: returns (encoder_hidden_states,
        hidden_states), two views of one joint output (which the next block joins again
        without a copy)."""
        text_seq_len = encoder_hidden_states.shape[1]
        joint = _joined(encoder_hidden_states, hidden_states)
        out = self._joint(joint, temb, image_rotary_emb, joint_attention_kwargs)
        return out[:, :text_seq_len], out[:, text_seq_len:]


class NormOut:
    """AdaLayerNormContinuous (the final norm) on kiln: LayerNorm + AdaLN in one kiln.layer_norm
    (diffusers' order: scale, then shift). Its projection is the module's own linear (on kiln
    with fp8 weights)."""

    def __init__(self, module):
        self.module = module

    def forward(self, x, conditioning_embedding):
        norm = self.module.norm
        emb = self.module.linear(F.silu(conditioning_embedding).to(x.dtype))
        scale, shift = modulation(emb, 2)
        return kiln.layer_norm(x, getattr(norm, "weight", None), getattr(norm, "bias", None),
                               shift=shift, scale=scale, eps=norm.eps)
