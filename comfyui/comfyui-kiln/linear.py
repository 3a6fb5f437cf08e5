"""fp8 linears on kiln, with per-token activation scales.

ComfyUI runs a Linear with e4m3 weights as an fp8 x fp8 matmul in comfy.ops.fp8_linear(layer,
x), which its fp8 operations call where fp8 compute is on (`--fast fp8_matrix_mult` for fp8
checkpoints, the fp8 optimizations of "scaled fp8" checkpoints; the node turns fp8 compute on
for sm_80 GPUs too) and which returns None for what it does not take. With no input scale in the
checkpoint it casts the activations to e4m3 as they are, clamped to +-448 (scale 1): small
activations land in e4m3's subnormals or flush to zero, large ones saturate. install() rebinds
comfy.ops.fp8_linear to fp8_linear, which instead quantizes each token (row) with its own scale
(kiln.quantize_fp8(x, "e4m3fn", "row"): amax / 448) and runs the fp8 x fp8 matmul with both
scales and the bias in the epilogue (kiln.matmul). A checkpoint's own input scale (scale_input
other than 1: ComfyUI fills in 1 where the checkpoint has none) is honored as a per-tensor scale.
The weight and bias come from ComfyUI's cast_bias_weight, so offloaded weights and weight
patches (LoRA) apply as they do on ComfyUI's path. What kiln does not take (part turned off, a
device kiln does not serve, an activation dtype or shape it does not read, a matmul it has no
kernel for) goes to ComfyUI's fp8_linear, logged once per reason.

ComfyUI versions that hold fp8 weights as comfy-kitchen QuantizedTensors reach torch._scaled_mm
from comfy-kitchen's layouts, which kiln.torch.patch() routes (see kiln.torch).
"""

import torch

import kiln

from . import parts

PART = "fp8_linear"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def install(ops) -> list[str]:
    """Rebinds comfy.ops.fp8_linear (ops None where ComfyUI has none); returns the hooks in
    place."""
    original = getattr(ops, "fp8_linear", None)
    if not callable(original) or not hasattr(ops, "cast_bias_weight"):
        return []
    if hasattr(original, "kiln_original"):
        return ["comfy.ops.fp8_linear"]

    def fp8_linear(layer, input, *args, **kwargs):
        out = None
        if not args and not kwargs:
            out = _on_kiln(ops, layer, input)
        return original(layer, input, *args, **kwargs) if out is None else out

    fp8_linear.kiln_original = original
    ops.fp8_linear = fp8_linear
    return ["comfy.ops.fp8_linear"]


def _static_input_scale(layer):
    """The layer's input scale when the checkpoint gave one (not ComfyUI's default of 1), else
    None. Read from the device once per layer."""
    scale = getattr(layer, "scale_input", None)
    if scale is None:
        return None
    if not hasattr(layer, "kiln_static_input_scale"):
        layer.kiln_static_input_scale = scale.numel() == 1 and float(scale) != 1.0
    return scale if layer.kiln_static_input_scale else None


def _on_kiln(ops, layer, x):
    weight = layer.weight
    if weight.dtype != torch.float8_e4m3fn:
        return None  # ComfyUI's fp8_linear declines it too
    if not parts.enabled(PART):
        parts.declined(PART, "turned off")
        return None
    if x.dtype not in _FLOATS or x.dim() < 2 or x.shape[-1] != weight.shape[1]:
        parts.declined(PART, f"input {x.dtype} {list(x.shape)} for weight {list(weight.shape)}")
        return None
    problem = parts.device_problem(x)
    if problem:
        parts.declined(PART, problem)
        return None
    w, bias = ops.cast_bias_weight(layer, x, dtype=weight.dtype, bias_dtype=x.dtype)
    scale_w = getattr(layer, "scale_weight", None)
    if scale_w is not None:
        scale_w = scale_w.to(device=x.device, dtype=torch.float32)
    scale_in = _static_input_scale(layer)
    a = x.reshape(-1, x.shape[-1])  # [M, K]
    try:
        if scale_in is None:
            q, scale_a = kiln.quantize_fp8(a, "e4m3fn", "row")  # scale_a [M] = amax / 448
            how = "per-token activation scales"
        else:
            scale_a = scale_in.to(device=x.device, dtype=torch.float32).reshape(1)
            q, _ = kiln.quantize_fp8(a, "e4m3fn", "tensor", scale=scale_a)
            how = "the checkpoint's input scale"
        out = kiln.matmul(q, w, a_scale=scale_a, w_scale=scale_w, bias=bias, out_dtype=x.dtype)
    except (kiln.InvalidArgumentError, kiln.UnsupportedError) as error:
        parts.declined(PART, f"kiln: {error}")
        return None
    parts.took(PART, f"fp8 x fp8 matmul with {how}, {x.dtype} on {x.device.type}")
    return out.reshape(*x.shape[:-1], w.shape[0])
