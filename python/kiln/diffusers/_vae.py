"""The VAE decoder of Flux.2 (AutoencoderKLFlux2) and FLUX.1 (AutoencoderKL) on kiln.

Every convolution of the decoder (and the post-quant 1x1) runs kiln.conv2d; each ResnetBlock2D
runs GroupNorm + SiLU as one kiln.group_norm(silu=True) before each of its convolutions, and the
decoder's last GroupNorm + SiLU likewise; the mid-block attention runs through
VaeAttnProcessor (set with diffusers' own Attention.set_processor): kiln.group_norm, one QKV GEMM,
kiln.attention, the out projection. The decoder works in channels-last memory from its first
convolution to its last (kiln.conv2d and kiln.group_norm keep the format, the attention reads
the [N, H W, C] tokens as a view of it) and returns contiguous NCHW as diffusers does.

The encoder is left to diffusers.
"""

import logging

import torch
import torch.nn.functional as F

import kiln

from .._C import UnsupportedError

log = logging.getLogger("kiln.diffusers")

# kiln.attention's largest head dim. The Flux VAEs' mid-block attention is one head of 512.
MAX_ATTENTION_HEAD_DIM = 256


class Conv:
    """nn.Conv2d.forward as kiln.conv2d with the module's weight and bias (groups = 1, zero
    padding). The decoder's activations are channels-last, so the weight is held as a
    channels-last (OHWI) copy made once: kiln.conv2d then reads its rows in the order of x's
    channels with 16-byte loads instead of copying or gathering an OIHW weight on every call. The
    module's own weight is left as it is."""

    def __init__(self, conv: torch.nn.Conv2d):
        self.conv = conv
        self.weight = conv.weight.detach().contiguous(memory_format=torch.channels_last)

    def forward(self, x):
        c = self.conv
        return kiln.conv2d(x, self.weight, c.bias, stride=c.stride, padding=c.padding,
                           dilation=c.dilation)


def _group_norm_silu(norm: torch.nn.GroupNorm, x, silu: bool = True):
    return kiln.group_norm(x, norm.num_groups, norm.weight, norm.bias, eps=norm.eps, silu=silu)


class Resnet:
    """ResnetBlock2D.forward (no time embedding, no resampling, SiLU) on kiln:
    GroupNorm + SiLU, conv, GroupNorm + SiLU, conv, (1x1 shortcut), residual add."""

    def __init__(self, block):
        self.block = block

    def forward(self, input_tensor, temb=None, *args, **kwargs):
        if temb is not None:
            raise UnsupportedError("kiln.diffusers: the VAE's ResnetBlock2D got a time embedding")
        b = self.block
        h = b.conv1(_group_norm_silu(b.norm1, input_tensor))
        h = b.conv2(_group_norm_silu(b.norm2, h))
        shortcut = b.conv_shortcut(input_tensor) if b.conv_shortcut is not None else input_tensor
        out = shortcut + h
        return out if b.output_scale_factor == 1 else out / b.output_scale_factor


class VaeAttnProcessor:
    """AttnProcessor2_0 for the VAE mid-block's self-attention over the H W pixels, on kiln:
    kiln.group_norm, Q, K and V in one GEMM (weights concatenated at apply), kiln.attention, the
    out projection and the residual. Head dims above kiln.attention's 256 (the Flux VAEs' one
    head of 512) run on torch SDPA, said once in the log."""

    def __init__(self, attn):
        self.weight = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).detach()
        biases = [attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]
        self.bias = None if biases[0] is None else torch.cat(biases).detach()
        self.head_dim = attn.to_q.out_features // attn.heads
        if self.head_dim > MAX_ATTENTION_HEAD_DIM:
            log.info(
                "kiln.diffusers: the VAE's mid-block attention has head dim %d, above "
                "kiln.attention's %d: that attention runs on torch SDPA", self.head_dim,
                MAX_ATTENTION_HEAD_DIM)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or temb is not None:
            raise UnsupportedError(
                "kiln.diffusers: the VAE's attention got encoder_hidden_states, a mask or a "
                "time embedding; kiln runs self-attention over the pixels only")
        n, c, h, w = hidden_states.shape
        residual = hidden_states
        normed = _group_norm_silu(attn.group_norm, hidden_states, silu=False)
        tokens = normed.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view when channels-last
        qkv = F.linear(tokens, self.weight, self.bias).unflatten(-1, (3, attn.heads,
                                                                      self.head_dim))
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [N, heads, HW, hd] views
        if self.head_dim <= MAX_ATTENTION_HEAD_DIM:
            out = kiln.attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = attn.to_out[0](out.transpose(1, 2).reshape(n, h * w, c))
        out = out.view(n, h, w, c).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class Decoder:
    """Decoder.forward on kiln (the blocks patched as above), in channels-last memory, with the
    final GroupNorm + SiLU fused."""

    def __init__(self, decoder):
        self.decoder = decoder

    def forward(self, sample, latent_embeds=None):
        if latent_embeds is not None:
            raise UnsupportedError("kiln.diffusers: a spatial-norm VAE decoder (latent_embeds)")
        d = self.decoder
        sample = d.conv_in(sample.contiguous(memory_format=torch.channels_last))
        sample = d.mid_block(sample, None)
        for up_block in d.up_blocks:
            sample = up_block(sample, None)
        sample = d.conv_out(_group_norm_silu(d.conv_norm_out, sample))
        return sample.contiguous()
