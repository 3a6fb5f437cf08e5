"""The VAE decoder's convolutions on kiln.conv2d.

Every VAE ComfyUI builds (comfy.sd.VAE) holds its network in a ModelPatcher, which applies its
object patches when ComfyUI loads the VAE to decode. install() wraps VAE.__init__ so that each
new VAE gets one object patch per 2-D convolution of its decoder (`decoder.<path>.forward`): a
forward that runs kiln.conv2d (implicit GEMM, bias fused, x's memory format kept) and calls the
layer's own forward for what kiln does not take (part turned off, a device kiln does not serve,
groups, a padding mode other than zeros, string padding, a dtype it does not read), logged once
per reason. Unpatching the VAE (ComfyUI does it when it unloads one) restores the layers.

with_conv2d(vae, on) gives the Kiln node's VAE: a copy sharing the network, with a patcher clone
that has kiln's patches on or off.
"""

import copy

import torch

import kiln

from . import parts

PART = "vae_conv2d"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_comfy = {}  # "ops": comfy.ops, for its cast_bias_weight


def install(sd, ops) -> list[str]:
    """Wraps comfy.sd.VAE.__init__ to patch each new VAE's decoder (modules None where ComfyUI
    has none); returns the hooks in place."""
    vae_class = getattr(sd, "VAE", None)
    name = "comfy.sd.VAE (decoder convolutions as object patches)"
    if vae_class is None or not hasattr(ops, "cast_bias_weight"):
        return []
    _comfy["ops"] = ops
    parts.call_after_init(vae_class, add_patches)
    return [name]


def _decoder_convs(vae):
    """(object patch key, layer) of each 2-D convolution of the VAE's decoder."""
    model = getattr(vae, "first_stage_model", None)
    decoder = getattr(model, "decoder", None)
    if not isinstance(decoder, torch.nn.Module):
        return []
    return [(f"decoder.{name}.forward", layer) for name, layer in decoder.named_modules()
            if isinstance(layer, torch.nn.Conv2d)]


def add_patches(vae) -> int:
    """Adds kiln's object patches to the VAE's patcher; returns how many."""
    patcher = getattr(vae, "patcher", None)
    if patcher is None:
        return 0
    convs = _decoder_convs(vae)
    for key, layer in convs:
        patcher.add_object_patch(key, _forward(layer))
    return len(convs)


def with_conv2d(vae, on: bool):
    """A copy of `vae` (the network shared) whose decoder convolutions run on kiln or not."""
    out = copy.copy(vae)
    out.patcher = vae.patcher.clone()
    keys = [key for key, _ in _decoder_convs(vae)]
    for key in keys:
        out.patcher.object_patches.pop(key, None)
    if on:
        add_patches(out)
    return out


def _forward(layer):
    def forward(x, *args, **kwargs):
        out = None if args or kwargs else _on_kiln(layer, x)
        return type(layer).forward(layer, x, *args, **kwargs) if out is None else out

    forward.kiln_conv2d = True
    return forward


def _problem(layer, x) -> str | None:
    if layer.groups != 1:
        return f"groups = {layer.groups}"
    if layer.padding_mode != "zeros":
        return f"padding mode {layer.padding_mode}"
    if isinstance(layer.padding, str):
        return f"padding '{layer.padding}'"
    if x.dim() != 4 or x.dtype not in _FLOATS:
        return f"input {x.dtype} {list(x.shape)}"
    return parts.device_problem(x)


def _on_kiln(layer, x):
    if not parts.enabled(PART):
        parts.declined(PART, "turned off")
        return None
    problem = _problem(layer, x)
    if problem:
        parts.declined(PART, problem)
        return None
    if (getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None)
            or getattr(layer, "bias_function", None)):
        weight, bias = _comfy["ops"].cast_bias_weight(layer, x)
    else:
        weight, bias = layer.weight, layer.bias
    try:
        out = kiln.conv2d(x, weight, bias, stride=layer.stride, padding=layer.padding,
                          dilation=layer.dilation)
    except (kiln.InvalidArgumentError, kiln.UnsupportedError) as error:
        parts.declined(PART, f"kiln.conv2d: {error}")
        return None
    parts.took(PART, f"VAE decoder convolutions (kiln.conv2d), {x.dtype} on {x.device.type}")
    return out
