"""kiln.rope_flux for torch tensors, numpy arrays and CuPy arrays.

The output is allocated with the input's framework, on the input's device; CUDA work goes on that
framework's current stream. torch is never imported here: a torch tensor can only come from a
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


def rope_flux(x, pe=None, *, norm_weight=None, eps: float = 1e-6, out_dtype=None):
    """Flux rotary embedding fused with the [N, L, H, D] -> [N, H, L, D] permute that feeds
    attention, with an optional RMSNorm over D in front (Flux's QK-norm).

    x: [N, L, H, D] f32/f16/bf16, any strides (e.g. ``qkv[:, :, 0]`` of a packed
       [N, L, 3, H, D] QKV).
    pe: f32 [L, D/2, 2, 2] or [N, L, D/2, 2, 2], rotations [[cos, -sin], [sin, cos]] as BFL and
       ComfyUI build them; None permutes (and normalizes) only: the V path.
    norm_weight: [D] f32/f16/bf16; when given, x * rsqrt(mean(x^2) + eps) * norm_weight is
       rotated instead of x.
    out_dtype: "f32"/"f16"/"bf16" or a framework dtype; default x's dtype.

    Returns a contiguous [N, H, L, D] array of x's framework on x's device. Math is in f32.
    An empty x (any size 0) gives an empty result.
    """
    kind = _args.check_arrays("rope_flux", x=x, pe=pe, norm_weight=norm_weight)
    eps = _args.real("rope_flux", "eps", eps)
    if kind == "torch":
        from . import _torch

        return _torch.rope_flux(x, pe, norm_weight, eps, out_dtype)

    shape = rope_flux_out_shape(x.shape)
    out = _args.empty(kind, x, shape, _args.numpy_out_dtype("rope_flux", kind, out_dtype, x, "x"))
    _C.rope_flux(x, pe, out, norm_weight, eps, _args.stream(x, kind))
    return out
