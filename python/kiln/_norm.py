"""kiln.rms_norm, kiln.layer_norm and kiln.group_norm for torch tensors, numpy arrays and CuPy
arrays.

Outputs are allocated with x's framework on x's device; CUDA work goes on that framework's
current stream. torch tensors go through torch.ops.kiln.* (_torch_norm.py). numpy and CuPy have
no fp8 dtype: a quantized output comes back as its uint8 codes. The arrays are checked first
(_args: framework, device, byte order, autograd). torch is never imported here.
"""

from . import _C, _args
from ._conv2d import channels_last
from ._matmul import rows_of
from ._rows import outputs, quantize_format


def rms_norm(x, weight=None, *, eps=1e-6, out_dtype=None, quantize=None):
    """RMSNorm over the last dim: y = x * rsqrt(mean(x^2) + eps) * weight, math in f32.

    x: [..., D] f32/f16/bf16; rows may be strided, the last dim must be contiguous.
    weight: [D] f32/f16/bf16 or None.
    eps: finite, >= 0.
    out_dtype: "f32"/"f16"/"bf16" or a framework dtype; default x's dtype.
    quantize: None, or "e4m3fn" / "e5m2" (or the torch float8 dtype): also quantize y to fp8 for
       the next GEMM, in the same kernel, with one scale per row (token).

    Returns y (x's shape, contiguous), or with quantize (q, q_scale): q the fp8 codes of y (x's
    shape; numpy / CuPy: uint8), q_scale f32 [R] (R = the product of the leading dims), bit for
    bit kiln.quantize_fp8(y_f32, quantize, "row") of the f32 y (q_scale = amax / 448 for e4m3fn,
    1 for an all-zero row): what kiln.matmul(q, w, a_scale=q_scale, ...) takes. An empty x gives
    empty results (a row of D = 0 has q_scale 1).
    """
    kind = _args.check_arrays("rms_norm", x=x, weight=weight)
    eps = _args.real("rms_norm", "eps", eps)
    fmt = quantize_format("rms_norm", quantize, out_dtype)
    rows_of("rms_norm", "x", x.shape)
    if kind == "torch":
        from . import _torch_norm

        return _torch_norm.rms_norm(x, weight, eps, out_dtype, fmt)
    out, scale = outputs("rms_norm", kind, x, x.shape, out_dtype, fmt)
    _C.rms_norm(x, weight, out, scale, eps, _args.stream(x, kind), fmt=fmt)
    return out if fmt is None else (out, scale)


def layer_norm(x, weight=None, bias=None, *, shift=None, scale=None, eps=1e-6, out_dtype=None,
               quantize=None):
    """LayerNorm over the last dim (biased variance, as torch), then y = y * weight + bias, then
    the AdaLN modulation y = y * (1 + scale) + shift; math in f32. Flux's norm1 / norm2 / norm_out
    and the single blocks' norm with their modulation in one call.

    x: [..., D] (e.g. [B, L, D]) f32/f16/bf16; rows may be strided, the last dim contiguous.
    weight, bias: [D] or None (one dtype when both are given).
    shift, scale: [B, D] with B = x.shape[0] (one vector per batch element, broadcast over the
       dims between; rows may be strided, e.g. chunks of the modulation linear's output) or [D],
       or None (one dtype when both are given).
    eps, out_dtype, quantize: as kiln.rms_norm.
    """
    kind = _args.check_arrays("layer_norm", x=x, weight=weight, bias=bias, shift=shift,
                              scale=scale)
    eps = _args.real("layer_norm", "eps", eps)
    fmt = quantize_format("layer_norm", quantize, out_dtype)
    rows_of("layer_norm", "x", x.shape)
    if kind == "torch":
        from . import _torch_norm

        return _torch_norm.layer_norm(x, weight, bias, shift, scale, eps, out_dtype, fmt)
    out, out_scale = outputs("layer_norm", kind, x, x.shape, out_dtype, fmt)
    _C.layer_norm(x, weight, bias, shift, scale, out, out_scale, eps, _args.stream(x, kind),
                  fmt=fmt)
    return out if fmt is None else (out, out_scale)


def group_norm(x, num_groups, weight=None, bias=None, *, eps=1e-6, silu=False, out_dtype=None):
    """torch.nn.functional.group_norm, then SiLU when silu=True (the VAE's norm + nonlinearity).

    x: [N, C, H, W] f32/f16/bf16, contiguous NCHW or channels-last memory; the output has x's
       memory format (conv2d's rule). num_groups: an int dividing C. weight, bias: [C] or None.
    eps: finite, >= 0.
    out_dtype: "f32"/"f16"/"bf16" or a framework dtype; default x's dtype.

    An empty x (N, C, H or W = 0) gives an empty result.
    """
    kind = _args.check_arrays("group_norm", x=x, weight=weight, bias=bias)
    num_groups = _args.integer("group_norm", "num_groups", num_groups)
    eps = _args.real("group_norm", "eps", eps)
    if kind == "torch":
        from . import _torch_norm

        return _torch_norm.group_norm(x, num_groups, weight, bias, eps, bool(silu), out_dtype)
    out, _ = outputs("group_norm", kind, x, x.shape, out_dtype, None)
    if x.ndim == 4 and channels_last(x.shape, tuple(s // x.itemsize for s in x.strides)):
        n, c, h, w = x.shape
        out = out.reshape(n, h, w, c).transpose(0, 3, 1, 2)
    _C.group_norm(x, num_groups, weight, bias, out, eps, bool(silu), _args.stream(x, kind))
    return out
