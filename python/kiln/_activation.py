"""kiln.glu and kiln.gelu_tanh for torch tensors, numpy arrays and CuPy arrays.

Outputs are allocated with x's framework on x's device; CUDA work goes on that framework's
current stream. torch tensors go through torch.ops.kiln.* (_torch_activation.py). numpy and CuPy
have no fp8 dtype: a quantized output comes back as its uint8 codes. The arrays are checked
first (_args: framework, device, byte order, autograd). torch is never imported here.
"""

from . import _C, _args
from ._C import InvalidArgumentError
from ._matmul import rows_of
from ._rows import outputs, quantize_format

_ACTIVATIONS = ("silu", "gelu_tanh")


def glu_out_shape(shape) -> tuple:
    """[..., F] for x [..., 2F]."""
    if len(shape) < 1 or shape[-1] % 2:
        raise InvalidArgumentError(
            f"kiln::glu: x has shape {_args.shape_str(shape)}, expected [..., 2F] (the gate half, "
            "then the linear half)"
        )
    return (*shape[:-1], shape[-1] // 2)


def activation_name(activation) -> str:
    if not isinstance(activation, str) or activation not in _ACTIVATIONS:
        raise InvalidArgumentError(
            f"kiln::glu: activation is {activation!r}, expected 'silu' or 'gelu_tanh'"
        )
    return activation


def glu(x, *, activation="silu", out_dtype=None, quantize=None):
    """Gated linear unit: y = act(x[..., :F]) * x[..., F:], math in f32. activation "silu" is
    SwiGLU (Flux.2's Flux2SwiGLU; an LLM's silu(gate) * up with gate and up concatenated),
    "gelu_tanh" GEGLU with the tanh approximation.

    x: [..., 2F] f32/f16/bf16; rows may be strided (e.g. the MLP part of a fused projection), the
       last dim contiguous.
    out_dtype: "f32"/"f16"/"bf16" or a framework dtype; default x's dtype.
    quantize: None, or "e4m3fn" / "e5m2" (or the torch float8 dtype): also quantize y to fp8 for
       the next GEMM with one scale per row, in the same kernel.

    Returns y [..., F] (contiguous), or with quantize (q, q_scale): q the fp8 codes of y (numpy /
    CuPy: uint8), q_scale f32 [R], bit for bit kiln.quantize_fp8(y_f32, quantize, "row") of the
    f32 y; the pair kiln.matmul takes as fp8 a with a_scale. An empty x gives empty results (a
    row of F = 0 has q_scale 1).
    """
    kind = _args.check_arrays("glu", x=x)
    activation = activation_name(activation)
    fmt = quantize_format("glu", quantize, out_dtype)
    shape = glu_out_shape(x.shape)
    if kind == "torch":
        from . import _torch_activation

        return _torch_activation.glu(x, activation, out_dtype, fmt)
    out, scale = outputs("glu", kind, x, shape, out_dtype, fmt)
    _C.glu(x, out, scale, activation, _args.stream(x, kind), fmt=fmt)
    return out if fmt is None else (out, scale)


def gelu_tanh(x, *, out_dtype=None, quantize=None):
    """GELU with the tanh approximation (torch's approximate="tanh"), FLUX.1's MLP activation:
    0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), math in f32.

    x: [..., F] f32/f16/bf16; rows may be strided, the last dim contiguous.
    out_dtype, quantize: as kiln.glu. Returns y of x's shape, or (q, q_scale).
    """
    kind = _args.check_arrays("gelu_tanh", x=x)
    fmt = quantize_format("gelu_tanh", quantize, out_dtype)
    rows_of("gelu_tanh", "x", x.shape)
    if kind == "torch":
        from . import _torch_activation

        return _torch_activation.gelu_tanh(x, out_dtype, fmt)
    out, scale = outputs("gelu_tanh", kind, x, x.shape, out_dtype, fmt)
    _C.gelu_tanh(x, out, scale, _args.stream(x, kind), fmt=fmt)
    return out if fmt is None else (out, scale)
