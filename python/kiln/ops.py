"""kiln ops for torch tensors, numpy arrays and CuPy arrays.

The output is allocated with the input's framework, on the input's device; CUDA work goes on
that framework's current stream. torch is never imported here: a torch tensor can only come from
a process that has imported it already.
"""

import sys

import numpy as np

from . import _C
from ._C import InvalidArgumentError

# Accepted spellings of an output dtype, by kiln name.
_DTYPE_ALIASES = {
    "f32": "f32",
    "float32": "f32",
    "float": "f32",
    "f16": "f16",
    "float16": "f16",
    "half": "f16",
    "bf16": "bf16",
    "bfloat16": "bf16",
}
_NUMPY_DTYPES = {"f32": np.float32, "f16": np.float16}


def dtype_name(op: str, dtype) -> str:
    """The kiln name ("f32", "f16", "bf16") of a torch/numpy/CuPy dtype or a string."""
    text = str(dtype).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(text)
    if name is None:
        expected = ", ".join(sorted(set(_DTYPE_ALIASES.values())))
        raise InvalidArgumentError(f"kiln::{op}: out_dtype is {dtype}, expected one of {expected}")
    return name


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def rope_flux_out_shape(x_shape) -> tuple:
    """[N, H, L, D] for x of shape [N, L, H, D]."""
    if len(x_shape) != 4:
        raise InvalidArgumentError(
            f"kiln::rope_flux: x has shape {_shape_str(x_shape)}, expected 4 dims [N, L, H, D]"
        )
    n, l, h, d = x_shape
    return (n, h, l, d)


def _check_out(x_shape, out, out_dtype) -> None:
    """out must have the [N, H, L, D] shape of x [N, L, H, D]; out_dtype, if given, its dtype."""
    shape = rope_flux_out_shape(x_shape)
    if tuple(out.shape) != shape:
        raise InvalidArgumentError(
            f"kiln::rope_flux: out has shape {_shape_str(out.shape)}, expected "
            f"{_shape_str(shape)} ([N, H, L, D] for x {_shape_str(x_shape)})"
        )
    if out_dtype is not None and dtype_name("rope_flux", out_dtype) != dtype_name(
            "rope_flux", out.dtype):
        raise InvalidArgumentError(
            f"kiln::rope_flux: out_dtype is {out_dtype} but out is {out.dtype}; expected "
            "out_dtype None or out's dtype"
        )


def rope_flux(x, pe=None, *, norm_weight=None, eps: float = 1e-6, out_dtype=None, out=None):
    """Flux rotary embedding fused with the [N, L, H, D] -> [N, H, L, D] permute that feeds
    attention, with an optional RMSNorm over D in front (Flux's QK-norm).

    x: [N, L, H, D] f32/f16/bf16, any strides (e.g. ``qkv[:, :, 0]`` of a packed
       [N, L, 3, H, D] QKV).
    pe: f32 [L, D/2, 2, 2] or [N, L, D/2, 2, 2], rotations [[cos, -sin], [sin, cos]] as BFL and
       ComfyUI build them; None permutes (and normalizes) only: the V path.
    norm_weight: [D] f32/f16/bf16; when given, x * rsqrt(mean(x^2) + eps) * norm_weight is
       rotated instead of x.
    out_dtype: "f32"/"f16"/"bf16" or a framework dtype; default x's dtype (out's with out).
    out: None, or the [N, H, L, D] array to write (x's framework and device) and return: D
       contiguous, rows any strides that do not overlap, e.g. a row range ``buf[:, :, a:b]`` of a
       contiguous [N, H, L', D] buffer, so that text and image tokens projected by different
       weights land in one joint attention input without a concatenation copy.

    Returns a contiguous [N, H, L, D] array of x's framework on x's device (or out). Math is in
    f32.
    """
    if out is not None:
        _check_out(x.shape, out, out_dtype)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        from . import _torch

        if out is not None:
            return _torch.rope_flux_out(x, pe, norm_weight, eps, out)
        return _torch.rope_flux(x, pe, norm_weight, eps, out_dtype)

    shape = rope_flux_out_shape(x.shape)
    if isinstance(x, np.ndarray):
        if out is not None:
            _C.rope_flux(x, pe, out, norm_weight, eps, 0)
            return out
        name = dtype_name("rope_flux", out_dtype if out_dtype is not None else x.dtype)
        if name not in _NUMPY_DTYPES:
            raise InvalidArgumentError(
                f"kiln::rope_flux: out_dtype is {name}, which numpy has no type for; expected "
                "f32 or f16 (use torch for bf16)"
            )
        out = np.empty(shape, dtype=_NUMPY_DTYPES[name])
        _C.rope_flux(x, pe, out, norm_weight, eps, 0)
        return out

    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        dtype = out_dtype if out_dtype is not None else x.dtype
        with x.device:
            if out is None:
                out = cupy.empty(shape, dtype=dtype)
            _C.rope_flux(x, pe, out, norm_weight, eps, cupy.cuda.get_current_stream().ptr)
        return out

    raise InvalidArgumentError(
        f"kiln::rope_flux: x is a {type(x).__module__}.{type(x).__qualname__}, expected a torch "
        "tensor, a numpy array or a CuPy array"
    )
