"""kiln.rope_flux for torch tensors, numpy arrays and CuPy arrays.

The output is allocated with the input's framework, on the input's device (or given: out=); CUDA
work goes on that framework's current stream. The arrays are checked first (_args: framework,
device, byte order, autograd). torch is never imported here: a torch tensor can only come from a
process that has imported it already.
"""

from . import _C, _args
from ._C import InvalidArgumentError


def rope_flux_out_shape(x_shape) -> tuple:
    """[N, H, L, D] for x of shape [N, L, H, D]."""
    if len(x_shape) != 4:
        raise InvalidArgumentError(
            f"kiln::rope_flux: x has shape {_args.shape_str(x_shape)}, expected 4 dims "
            "[N, L, H, D]"
        )
    n, l, h, d = x_shape
    return (n, h, l, d)


def _check_out(x_shape, out, out_dtype) -> None:
    """out must have the [N, H, L, D] shape of x [N, L, H, D]; out_dtype, if given, its dtype."""
    shape = rope_flux_out_shape(x_shape)
    if tuple(out.shape) != shape:
        raise InvalidArgumentError(
            f"kiln::rope_flux: out has shape {_args.shape_str(out.shape)}, expected "
            f"{_args.shape_str(shape)} ([N, H, L, D] for x {_args.shape_str(x_shape)})"
        )
    if out_dtype is not None and _args.dtype_name("rope_flux", out_dtype) != _args.dtype_name(
            "rope_flux", out.dtype, "out"):
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
    f32. An empty x (any size 0) gives an empty result.
    """
    kind = _args.check_arrays("rope_flux", x=x, pe=pe, norm_weight=norm_weight, out=out)
    eps = _args.real("rope_flux", "eps", eps)
    if out is not None:
        _args.writable("rope_flux", "out", out)
        _check_out(x.shape, out, out_dtype)
    if kind == "torch":
        from . import _torch

        if out is not None:
            return _torch.rope_flux_out(x, pe, norm_weight, eps, out)
        return _torch.rope_flux(x, pe, norm_weight, eps, out_dtype)

    if out is None:
        out = _args.empty(kind, x, rope_flux_out_shape(x.shape),
                          _args.numpy_out_dtype("rope_flux", kind, out_dtype, x, "x"))
    _C.rope_flux(x, pe, out, norm_weight, eps, _args.stream(x, kind))
    return out
