"""kiln as a comfy-kitchen backend (comfy-kitchen: ComfyUI's kernel package, PyPI).

    import kiln.comfy_kitchen
    kiln.comfy_kitchen.register()             # kiln first in comfy-kitchen's priority
    kiln.comfy_kitchen.register(priority=2)   # or third: after the two backends ranked first
    kiln.comfy_kitchen.unregister()           # disabled and out of the priority list

comfy-kitchen's functions (comfy_kitchen.apply_rope, its torch.ops.comfy_kitchen.* ops and the
QuantizedTensor layouts built on them) ask its registry for a backend on every call; the first
backend in priority order whose constraints accept the call runs it. kiln registers these ops,
with comfy-kitchen's signatures (they are also this module's functions):

  apply_rope(xq, xk, freqs_cis), apply_rope1(x, freqs_cis)
      interleaved RoPE on x [B, H, L, D] with freqs_cis f32 [B or 1, 1, L' >= L, D/2, 2, 2]
      (rows past L are not read, as comfy-kitchen trims them): kiln.rope_flux on the
      [B, L, H, D] view of x, which writes [B, H, L, D], x's shape, contiguous.
  rms_rope(q, k, freqs_cis, q_scale, k_scale=None, epsilon), rms_rope1(x, freqs_cis, scale,
      epsilon): per-head RMSNorm then RoPE in the same kernel (kiln.rope_flux's norm_weight);
      freqs_cis' L' equal to L.
  quantize_per_tensor_fp8(x, scale, output_type), dequantize_per_tensor_fp8(x, scale,
      output_type): kiln.quantize_fp8 (granularity "tensor", the scale given) and
      kiln.dequantize, one-element scales.

Each op's constraints send the rest to the next backend: other layouts ([B, L, H, D] x with
freqs_cis [.., L, 1, ..]), bf16/f16 freqs_cis, split-half RoPE, the in-place variants, tensors
that require grad, devices kiln does not run (CUDA devices below sm_80 or without kiln's CUDA
runtime, ROCm), and operands on different devices. Math is kiln's: f32 with one rounding to the
output dtype, where comfy-kitchen's eager backend rounds some steps to the input dtype (a bf16
ulp apart at most per element).

kiln.torch.patch() calls register(); the ComfyUI node calls it when ComfyUI loads it.
"""

import sys
import threading

import torch

from . import _matmul
from ._C import InvalidArgumentError
from .device import cuda_available
from .ops import rope_flux

__all__ = [
    "BACKEND",
    "apply_rope",
    "apply_rope1",
    "dequantize_per_tensor_fp8",
    "device_problem",
    "is_registered",
    "quantize_per_tensor_fp8",
    "register",
    "rms_rope",
    "rms_rope1",
    "unregister",
]

BACKEND = "kiln"  # the name kiln has in comfy-kitchen's registry
KILN_MIN_CAPABILITY = (8, 0)  # kiln's CUDA kernels run on sm_80 and up

_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})
_FP8 = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})
_lock = threading.Lock()
_capability: dict[int, tuple[int, int]] = {}


# ---- the ops ---------------------------------------------------------------------------------


def _pe(freqs_cis: torch.Tensor, length: int) -> torch.Tensor:
    """kiln's pe ([L, D/2, 2, 2] or [B, L, D/2, 2, 2]) from comfy's [B|1, 1, L', D/2, 2, 2]."""
    pe = freqs_cis[:, 0, :length]
    return pe[0] if pe.shape[0] == 1 else pe


def apply_rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE of x [B, H, L, D]; returns a contiguous [B, H, L, D] in x's dtype."""
    return rope_flux(x.transpose(1, 2), _pe(freqs_cis, x.shape[2]))


def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    return apply_rope1(xq, freqs_cis), apply_rope1(xk, freqs_cis)


def rms_rope1(x: torch.Tensor, freqs_cis: torch.Tensor, scale: torch.Tensor,
              epsilon: float = 1e-6) -> torch.Tensor:
    """RMSNorm over D (weight `scale`) then interleaved RoPE, x [B, H, L, D]."""
    return rope_flux(x.transpose(1, 2), _pe(freqs_cis, x.shape[2]), norm_weight=scale,
                     eps=epsilon)


def rms_rope(q: torch.Tensor, k: torch.Tensor, freqs_cis: torch.Tensor, q_scale: torch.Tensor,
             k_scale: torch.Tensor | None = None, epsilon: float = 1e-6):
    return (rms_rope1(q, freqs_cis, q_scale, epsilon),
            rms_rope1(k, freqs_cis, q_scale if k_scale is None else k_scale, epsilon))


def quantize_per_tensor_fp8(x: torch.Tensor, scale: torch.Tensor,
                            output_type: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """q = saturate(round(x / scale)) in output_type, scale one element (f32)."""
    q, _ = _matmul.quantize_fp8(x, output_type, "tensor", scale.reshape(1))
    return q


def dequantize_per_tensor_fp8(x: torch.Tensor, scale: torch.Tensor,
                              output_type: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x * scale in output_type (the product in f32), scale one element."""
    return _matmul.dequantize(x, scale.reshape(1).to(torch.float32), out_dtype=output_type)


# ---- constraints -----------------------------------------------------------------------------


def device_problem(tensors) -> str | None:
    """Why kiln cannot run on these tensors' device, or None: several devices, a device type
    other than CPU and CUDA, ROCm, no CUDA runtime for kiln, a GPU below sm_80."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"operands on several devices {sorted(map(str, devices))}"
    device = devices.pop()
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"{device.type} device"
    if torch.version.hip is not None:
        return "ROCm device (kiln runs NVIDIA GPUs)"
    if not cuda_available():
        return "kiln has no CUDA runtime on this machine"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capability:
        _capability[index] = torch.cuda.get_device_capability(index)
    if _capability[index] < KILN_MIN_CAPABILITY:
        major, minor = _capability[index]
        return f"sm_{major}{minor} (kiln needs sm_80 or newer)"
    return None


def _call_rule(*names: str):
    """A comfy-kitchen call rule: the named tensor arguments on one device kiln runs and none
    requiring grad (kiln's ops have no backward)."""
    from comfy_kitchen.constraints import ValidationResult

    def rule(kwargs):
        tensors = [kwargs[n] for n in names if isinstance(kwargs.get(n), torch.Tensor)]
        for name in names:
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.requires_grad:
                return ValidationResult.fail(name, "requires grad: kiln's ops are inference only")
        problem = device_problem(tensors) if tensors else None
        if problem:
            return ValidationResult.fail("__device__", problem)
        return ValidationResult.ok()

    return rule


def _rope_rule(x_names, full_length: bool):
    """x [B, H, L, D] (D even) with freqs_cis f32 [B|1, 1, L', D/2, 2, 2]: L' >= L, or L' == L
    when full_length (the fused norm ops, which comfy-kitchen does not trim)."""
    from comfy_kitchen.constraints import ValidationResult

    def rule(kwargs):
        freqs = kwargs.get("freqs_cis")
        if not isinstance(freqs, torch.Tensor) or freqs.dim() != 6:
            return ValidationResult.fail("freqs_cis", "expected [B, 1, L, D/2, 2, 2]")
        for name in x_names:
            x = kwargs.get(name)
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                return ValidationResult.fail(name, "expected [B, H, L, D]")
            b, _, length, d = x.shape
            want = (d // 2, 2, 2)
            if d % 2 or tuple(freqs.shape[3:]) != want:
                return ValidationResult.fail(
                    "freqs_cis", f"shape {list(freqs.shape)} does not rotate {name} of shape "
                    f"{list(x.shape)} (expected [.., {d // 2}, 2, 2])")
            if freqs.shape[1] != 1 or freqs.shape[0] not in (1, b):
                return ValidationResult.fail(
                    "freqs_cis", f"shape {list(freqs.shape)}: kiln takes [B|1, 1, L, ..] "
                    "(heads in dim 1 of x)")
            if freqs.shape[2] < length or (full_length and freqs.shape[2] != length):
                return ValidationResult.fail(
                    "freqs_cis", f"{freqs.shape[2]} positions for {name} of {length}")
        return ValidationResult.ok()

    return rule


def _one_scale(kwargs):
    from comfy_kitchen.constraints import ValidationResult

    scale, x = kwargs.get("scale"), kwargs.get("x")
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        return ValidationResult.fail("scale", "kiln takes a one-element per-tensor scale")
    if isinstance(x, torch.Tensor) and x.dim() == 0:
        return ValidationResult.fail("x", "a 0-d tensor")
    return ValidationResult.ok()


def _capabilities(devices: frozenset) -> dict:
    from comfy_kitchen.constraints import ExactDims, FunctionConstraints, ParamConstraint

    def constraints(params, *rules):
        return FunctionConstraints(params=params, default_devices=devices,
                                   call_rules=tuple(rules))

    x4 = ParamConstraint(dtypes=_FLOATS, shape_rules=(ExactDims(4),))
    freqs = ParamConstraint(dtypes=frozenset({torch.float32}), shape_rules=(ExactDims(6),))
    weight = ParamConstraint(dtypes=_FLOATS, shape_rules=(ExactDims(1),))
    return {
        "apply_rope1": constraints({"x": x4, "freqs_cis": freqs},
                                   _rope_rule(("x",), False), _call_rule("x", "freqs_cis")),
        "apply_rope": constraints({"xq": x4, "xk": x4, "freqs_cis": freqs},
                                  _rope_rule(("xq", "xk"), False),
                                  _call_rule("xq", "xk", "freqs_cis")),
        "rms_rope1": constraints({"x": x4, "freqs_cis": freqs, "scale": weight},
                                 _rope_rule(("x",), True), _call_rule("x", "freqs_cis", "scale")),
        "rms_rope": constraints({"q": x4, "k": x4, "freqs_cis": freqs, "q_scale": weight,
                                 "k_scale": weight},
                                _rope_rule(("q", "k"), True),
                                _call_rule("q", "k", "freqs_cis", "q_scale", "k_scale")),
        "quantize_per_tensor_fp8": constraints(
            {"x": ParamConstraint(dtypes=_FLOATS),
             "scale": ParamConstraint(dtypes=frozenset({torch.float32})),
             "output_type": ParamConstraint(dtypes=_FP8)},
            _one_scale, _call_rule("x", "scale")),
        "dequantize_per_tensor_fp8": constraints(
            {"x": ParamConstraint(dtypes=_FP8), "scale": ParamConstraint(dtypes=_FLOATS),
             "output_type": ParamConstraint(dtypes=_FLOATS)},
            _one_scale, _call_rule("x", "scale")),
    }


# ---- registration ----------------------------------------------------------------------------


def _registry():
    """comfy-kitchen's registry (comfy_kitchen imported here if it was not yet)."""
    try:
        import comfy_kitchen
    except ImportError as error:
        raise InvalidArgumentError(
            f"kiln.comfy_kitchen: comfy_kitchen is not installed ({error}); "
            "pip install comfy-kitchen"
        ) from None
    return comfy_kitchen.registry


def is_registered() -> bool:
    """Whether kiln is an enabled comfy-kitchen backend in its priority list."""
    ck = sys.modules.get("comfy_kitchen")
    if ck is None:
        return False
    return ck.registry.is_available(BACKEND) and BACKEND in ck.registry._priority


def register(priority: int = 0, devices=("cuda", "cpu")) -> None:
    """Registers kiln as a comfy-kitchen backend at position `priority` of its priority list
    (0: first; past the end: last). A second call moves kiln to the new position.

    devices: the device types kiln takes calls on ("cuda", "cpu"; every op kiln registers is
    elementwise, and kiln's CPU code runs them at CPU speed).
    """
    if not isinstance(priority, int) or priority < 0:
        raise InvalidArgumentError(
            f"kiln.comfy_kitchen.register: priority is {priority!r}, expected an int >= 0"
        )
    devices = frozenset(devices)
    if not devices or not devices <= {"cuda", "cpu"}:
        raise InvalidArgumentError(
            f"kiln.comfy_kitchen.register: devices is {sorted(devices)}, expected 'cuda' "
            "and/or 'cpu'"
        )
    registry = _registry()
    with _lock:
        registry.register(BACKEND, sys.modules[__name__], _capabilities(devices))
        registry.enable(BACKEND)
        order = [name for name in registry._priority if name != BACKEND]
        order.insert(min(priority, len(order)), BACKEND)
        registry.set_priority(order)


def unregister() -> None:
    """Disables kiln in comfy-kitchen and takes it out of the priority list. Idempotent."""
    ck = sys.modules.get("comfy_kitchen")
    if ck is None:
        return
    with _lock:
        ck.registry.disable(BACKEND)
        ck.registry.set_priority([name for name in ck.registry._priority if name != BACKEND])
