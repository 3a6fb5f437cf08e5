"""kiln.rope (LLM rotary embedding) for torch tensors, numpy arrays and CuPy arrays.

The output is allocated with x's framework on x's device; CUDA work goes on that framework's
current stream. The arrays are checked first (_args: framework, device, byte order, autograd).
torch is never imported here: a torch tensor can only come from a process that has imported it
already.
"""

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


def check_style(op: str, style) -> str:
    if not isinstance(style, str) or style not in _STYLES:
        raise InvalidArgumentError(
            f"kiln::{op}: style is {style!r}, expected 'normal' (adjacent pairs, llama.cpp's "
            "llama) or 'neox' (halves, Qwen)"
        )
    return style


def rope(x, positions, *, theta, style="normal", norm_weight=None, eps=1e-6, cache=None,
         out_dtype=None):
    """Rotary position embedding of an LLM fused with the [N, T, H, D] -> [N, H, T, D] permute
    that feeds attention, an optional per-head RMSNorm in front, and optionally the write into a
    KV cache at the tokens' positions.

    x: [N, T, H, D] f32/f16/bf16, any strides (a slice of the packed QKV projection); D even.
    positions: i32/i64 [N, T] on x's device (so a captured CUDA graph replays with new ones).
    theta: frequency base, finite and > 0 (pair i turns by position * theta^(-2i/D)); None: no
       rotation (the V path).
    style: "normal" rotates adjacent pairs (x[2i], x[2i+1]), llama.cpp's rope of the llama
       architecture; "neox" rotates halves (x[i], x[i + D/2]): Qwen, HF's rotate_half.
    norm_weight: [D] f32/f16/bf16; when given, x * rsqrt(mean(x^2) + eps) * norm_weight is
       rotated instead of x (Qwen3's QK-norm). eps: finite, >= 0.
    cache: None returns a contiguous [N, H, T, D] array (out_dtype, default x's dtype); a KV
       cache [N, H, S, D] (f32/f16/bf16, unit stride in D; writable) gets row (n, t, h) at
       cache[n, h, positions[n, t]] and None is returned. Positions must lie in [0, S) (the CPU
       backend raises; CUDA skips rows outside). Errors of a call with a cache name
       kiln::rope_cache.

    Math in f32, angles in f64. An empty x (N, T, H or D = 0) gives an empty result (or writes
    nothing).
    """
    op = "rope" if cache is None else "rope_cache"
    kind = _args.check_arrays(op, x=x, positions=positions, norm_weight=norm_weight, cache=cache)
    style = check_style(op, style)
    theta = None if theta is None else _args.real(op, "theta", theta, positive=True)
    eps = _args.real(op, "eps", eps)
    if cache is not None:
        if out_dtype is not None:
            raise InvalidArgumentError(
                "kiln::rope_cache: out_dtype is given with a cache, expected None (the cache's "
                "dtype is the output's)"
            )
        _args.writable(op, "cache", cache)
    if kind == "torch":
        from . import _torch_rope

        return _torch_rope.rope(x, positions, theta, style, norm_weight, eps, cache, out_dtype)
    if cache is not None:
        _C.rope(x, positions, cache, theta, style, norm_weight, eps, True, _args.stream(x, kind))
        return None
    out = _args.empty(kind, x, out_shape(x.shape),
                      _args.numpy_out_dtype(op, kind, out_dtype, x, "x"))
    _C.rope(x, positions, out, theta, style, norm_weight, eps, False, _args.stream(x, kind))
    return out
