"""Linears with fp8 weights on kiln, whatever operations ComfyUI picked for the model.

ComfyUI builds a diffusion model's layers from the operations class comfy.ops.pick_operations
chooses (model_base.BaseModel; ControlNets too): manual_cast where the weights' dtype is not the
compute dtype, which dequantizes every fp8 weight to bf16 on every call (cast_bias_weight);
fp8_ops with `--fast fp8_matrix_mult`, whose Linear calls comfy.ops.fp8_linear only outside
training mode (this ComfyUI never calls .eval() on its Flux models, so plain e4m3 checkpoints
dequantize there too); scaled_fp8_ops for "scaled fp8" checkpoints. install() rebinds
comfy.ops.pick_operations so that it returns operations(chosen): a subclass of the class ComfyUI
chose whose Linear is a subclass of that class's Linear, everything else ComfyUI's. That Linear,
where the weight is fp8 (e4m3fn or e5m2), runs kiln.matmul on the weight as stored, with the
checkpoint's weight scale (scale_weight) where it has one:

  fp8 activations (fp8_activations(device): sm_89 and newer, CPU)
      each token quantized to e4m3 with its own scale (amax / 448, kiln.quantize_fp8 "row"),
      fp8 x fp8 matmul with both scales and the bias in the epilogue; a checkpoint's own input
      scale (scale_input other than ComfyUI's default 1) is used as a per-tensor scale instead.
  bf16 activations (sm_80 to sm_87, or KILN_COMFY_FP8_ACTIVATIONS=bf16)
      the activations as they come against the fp8 weight, decoded in registers by kiln's GEMM
      (GEMV for few rows): the weight is never dequantized into memory.

Layers with one row per batch element (x [B, K] or [B, 1, K]: the AdaLN modulation and the
embedders fed by the timestep) always take their activations as they come: kiln's GEMV reads
the fp8 weight at the cost of reading it, so quantizing saves nothing and would only round the
conditioning. ControlNets (pick_operations with disable_fast_fp8) keep bf16 activations.

What kiln does not take goes to the Linear of the class ComfyUI chose (its dequantize, or its
fp8_linear), logged once per reason: the part turned off, weight patches applied at call time
(LoRA on a partially loaded model, ComfyUI's weight_function / bias_function), autograd, an
activation dtype or shape kiln does not read, a device kiln does not serve, a matmul kiln has no
kernel for. Linears with other weights are ComfyUI's, untouched.

install() also rebinds comfy.ops.fp8_linear, ComfyUI's fp8 x fp8 matmul, for models built from
operations a node chose itself (model_options["custom_operations"] of ComfyUI's fp8 classes):
the same kiln.matmul, None (ComfyUI's own) for what kiln does not take.

matmul() is the GEMM the Flux blocks on kiln (blocks.py) call, with the AdaLN gate and the
residual add in its epilogue and activations that the op before quantized.

ComfyUI versions that hold fp8 weights as comfy-kitchen QuantizedTensors reach torch._scaled_mm
from comfy-kitchen's layouts, which kiln.torch.patch() routes (see kiln.torch).
"""

import inspect

import torch

import kiln
from kiln.diffusers._linear import Quantized, quantize_rows

from . import parts

PART = "fp8_linear"
FP8_WEIGHTS = (torch.float8_e4m3fn, torch.float8_e5m2)
ACTIVATION_FORMAT = "e4m3fn"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_comfy = {}  # "ops": comfy.ops, for its cast_bias_weight
_classes = {}  # (ComfyUI's operations class, fp8 activations allowed) -> kiln's subclass


def install(ops) -> list[str]:
    """Rebinds comfy.ops.pick_operations and comfy.ops.fp8_linear (ops None where ComfyUI has
    none); returns the hooks in place."""
    if not hasattr(ops, "cast_bias_weight"):
        return []
    _comfy["ops"] = ops
    installed = []
    pick = getattr(ops, "pick_operations", None)
    if callable(pick):
        if not hasattr(pick, "kiln_original"):
            ops.pick_operations = _pick_operations(pick)
        installed.append("comfy.ops.pick_operations")
    original = getattr(ops, "fp8_linear", None)
    if callable(original):
        if not hasattr(original, "kiln_original"):
            ops.fp8_linear = _fp8_linear(original)
        installed.append("comfy.ops.fp8_linear")
    return installed


def _pick_operations(original):
    signature = inspect.signature(original)

    def pick_operations(*args, **kwargs):
        chosen = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        return operations(chosen, not bound.arguments.get("disable_fast_fp8", False))

    pick_operations.kiln_original = original
    return pick_operations


def operations(base, fp8_activations: bool = True):
    """kiln's subclass of ComfyUI's operations class `base`: its Linear runs fp8 weights on kiln
    (with fp8 activations where allowed), everything else is `base`'s."""
    if hasattr(base, "kiln_base") or not isinstance(getattr(base, "Linear", None), type):
        return base
    key = (base, fp8_activations)
    if key not in _classes:
        _classes[key] = type(f"kiln_{base.__name__}", (base,), {
            "Linear": _linear_class(base.Linear, fp8_activations), "kiln_base": base})
    return _classes[key]


def _linear_class(comfy_linear, fp8_activations: bool):
    class Linear(comfy_linear):
        kiln_fp8_activations = fp8_activations

        def forward_comfy_cast_weights(self, input, *args, **kwargs):
            out = None
            if is_fp8(self) and not args and not kwargs:
                out = matmul(self, input)
            if out is None:
                return super().forward_comfy_cast_weights(input, *args, **kwargs)
            return out

    Linear.__qualname__ = f"kiln.{comfy_linear.__qualname__}"
    return Linear


def _fp8_linear(original):
    def fp8_linear(layer, input, *args, **kwargs):
        out = None
        # kiln's Linear asked kiln already before ComfyUI's forward came here.
        if not args and not kwargs and not hasattr(layer, "kiln_fp8_activations"):
            out = matmul(layer, input) if is_fp8(layer) else None
        return original(layer, input, *args, **kwargs) if out is None else out

    fp8_linear.kiln_original = original
    return fp8_linear


def is_fp8(layer) -> bool:
    weight = getattr(layer, "weight", None)
    return weight is not None and weight.dtype in FP8_WEIGHTS


def problem(layer, x) -> str | None:
    """Why kiln does not run the fp8 layer on activations x (None: it does)."""
    if not parts.enabled(PART):
        return "turned off"
    if getattr(layer, "weight_function", None) or getattr(layer, "bias_function", None):
        return ("weight patches applied at call time (LoRA on a partially loaded model: "
                "weight_function / bias_function)")
    weight = layer.weight
    if x.dtype not in _FLOATS or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        return f"input {x.dtype} {list(x.shape)} for weight {list(weight.shape)}"
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return "autograd (kiln's matmul has no backward)"
    return parts.device_problem(x)


def _static_input_scale(layer):
    """The layer's input scale when the checkpoint gave one (not ComfyUI's default of 1), else
    None. Read from the device once per layer."""
    scale = getattr(layer, "scale_input", None)
    if scale is None:
        return None
    if not hasattr(layer, "kiln_static_input_scale"):
        layer.kiln_static_input_scale = scale.numel() == 1 and float(scale) != 1.0
    return scale if layer.kiln_static_input_scale else None


def _fp8_activations(layer, x) -> bool:
    per_batch = x.dim() < 3 or x.shape[-2] == 1  # one row per batch element
    return (getattr(layer, "kiln_fp8_activations", True) and not per_batch
            and parts.fp8_activations(x.device))


def quantizes(layer, x) -> bool:
    """Whether the fp8 layer takes x [..., K] from kiln as fp8 with per-token scales: what the
    op before it then quantizes (blocks.py)."""
    return (is_fp8(layer) and problem(layer, x) is None and _fp8_activations(layer, x)
            and _static_input_scale(layer) is None)


def matmul(layer, x, *, gate=None, residual=None, out_dtype=None):
    """The fp8 layer on kiln: residual + gate * (x W^T + bias), the scales, bias, gate and
    residual in the epilogue, out rounded once (to out_dtype: default the residual's dtype, else
    x's).

    x: [..., K] f32/f16/bf16, or a Quantized pair (fp8 [..., K] with per-token scales) from an op
       that quantized it for this layer (quantizes() said so).
    gate: [B, N] (x [B, L, K]) or None; residual: out's shape or None.
    Returns None where kiln does not take a plain x (logged); a Quantized x is always taken.
    """
    weight = layer.weight
    quantized = isinstance(x, Quantized)
    if not quantized:
        reason = problem(layer, x)
        if reason:
            parts.declined(PART, reason)
            return None
    data = x.q if quantized else x
    if out_dtype is None:
        out_dtype = residual.dtype if residual is not None else data.dtype
    w, bias = _comfy["ops"].cast_bias_weight(layer, dtype=weight.dtype, device=data.device,
                                             bias_dtype=out_dtype)
    w_scale = getattr(layer, "scale_weight", None)
    if w_scale is not None:
        w_scale = w_scale.to(device=data.device, dtype=torch.float32)
    if quantized:
        a, a_scale = x.q, x.scale
        how = "fp8 x fp8, per-token activation scales (quantized by the op before)"
    elif _static_input_scale(layer) is not None and _fp8_activations(layer, x):
        a_scale = layer.scale_input.to(device=x.device, dtype=torch.float32).reshape(1)
        a, _ = kiln.quantize_fp8(x, ACTIVATION_FORMAT, "tensor", scale=a_scale)
        how = "fp8 x fp8, the checkpoint's input scale"
    elif _fp8_activations(layer, x):
        a, a_scale = quantize_rows(x)
        how = "fp8 x fp8, per-token activation scales"
    else:
        a, a_scale = x, None
        how = "activations as they come x fp8 weights decoded in registers"
    try:
        out = kiln.matmul(a, w, w_scale=w_scale, a_scale=a_scale, bias=bias, gate=gate,
                          residual=residual, out_dtype=out_dtype)
    except (kiln.InvalidArgumentError, kiln.UnsupportedError) as error:
        if quantized:
            raise
        parts.declined(PART, f"kiln: {error}")
        return None
    parts.took(PART, f"{how} on {data.device.type}")
    return out
