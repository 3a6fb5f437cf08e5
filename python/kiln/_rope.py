"""kiln.rope (LLM rotary embedding) for torch tensors, numpy arrays and CuPy arrays.

The output is allocated with x's framework on x's device; CUDA work goes on that framework's
current stream. torch is never imported here: a torch tensor can only come from a process that
has imported it already.
"""

import sys

import numpy as np

from . import _C, _args
from ._C import InvalidArgumentError

_STYLES = ("normal", "neox")


def out_shape(x_shape) -> tuple:
    """[N, H, T, D] for x of shape [N, T, H, D]."""
    if len(x_shape) != 4:
        raise InvalidArgumentError(
            f"kiln::rope: x has shape {_args.shape_str(x_shape)}, expected 4 dims [N, T, H, D]"
        )
    n, t, h, d = x_shape
    return (n, h, t, d)


def check_style(style) -> str:
    if style not in _STYLES:
        raise InvalidArgumentError(
            f"kiln::rope: style is {style!r}, expected 'normal' (adjacent pairs, llama.cpp's "
            "llama) or 'neox' (halves, Qwen)"
        )
    return style


def check_theta(theta):
    return None if theta is None else float(theta)


def rope(x, positions, *, theta, style="normal", norm_weight=None, eps=1e-6, cache=None,
         out_dtype=None):
    """Rotary position embedding of an LLM fused with the [N, T, H, D] -> [N, H, T, D] permute
    that feeds attention, an optional per-head RMSNorm in front, and optionally the write into a
    KV cache at the tokens' positions.

    x: [N, T, H, D] f32/f16/bf16, any strides (a slice of the packed QKV projection); D even.
    positions: i32/i64 [N, T] on x's device (so a captured CUDA graph replays with new ones).
    theta: frequency base (pair i turns by position * theta^(-2i/D)); None: no rotation (the
       V path).
    style: "normal" rotates adjacent pairs (x[2i], x[2i+1]), llama.cpp's rope of the llama
       architecture; "neox" rotates halves (x[i], x[i + D/2]): Qwen, HF's rotate_half.
    norm_weight: [D] f32/f16/bf16; when given, x * rsqrt(mean(x^2) + eps) * norm_weight is
       rotated instead of x (Qwen3's QK-norm).
    cache: None returns a contiguous [N, H, T, D] array (out_dtype, default x's dtype); a KV
       cache [N, H, S, D] (f32/f16/bf16, unit stride in D) gets row (n, t, h) at
       cache[n, h, positions[n, t]] and None is returned. Positions must lie in [0, S) (the CPU
       backend raises; CUDA skips rows outside).

    Math in f32, angles in f64.
    """
    style = check_style(style)
    theta = check_theta(theta)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        from . import _torch_rope

        return _torch_rope.rope(x, positions, theta, style, norm_weight, eps, cache, out_dtype)

    if cache is not None:
        if out_dtype is not None:
            raise InvalidArgumentError(
                "kiln::rope_cache: out_dtype is given with a cache, expected None (the cache's "
                "dtype is the output's)"
            )
        stream = 0
        cupy = sys.modules.get("cupy")
        if cupy is not None and isinstance(x, cupy.ndarray):
            stream = cupy.cuda.get_current_stream().ptr
        _C.rope(x, positions, cache, theta, style, norm_weight, float(eps), True, stream)
        return None

    shape = out_shape(x.shape)
    if isinstance(x, np.ndarray):
        name = _args.dtype_name("rope", out_dtype if out_dtype is not None else x.dtype)
        if name not in _args.NUMPY_DTYPES:
            raise InvalidArgumentError(
                f"kiln::rope: out_dtype is {name}, which numpy has no type for; expected f32 or "
                "f16 (use torch for bf16)"
            )
        out = np.empty(shape, dtype=_args.NUMPY_DTYPES[name])
        _C.rope(x, positions, out, theta, style, norm_weight, float(eps), False, 0)
        return out

    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        with x.device:
            out = cupy.empty(shape, dtype=out_dtype if out_dtype is not None else x.dtype)
            _C.rope(x, positions, out, theta, style, norm_weight, float(eps), False,
                    cupy.cuda.get_current_stream().ptr)
        return out

    raise InvalidArgumentError(
        f"kiln::rope: x is a {type(x).__module__}.{type(x).__qualname__}, expected a torch "
        "tensor, a numpy array or a CuPy array"
    )
