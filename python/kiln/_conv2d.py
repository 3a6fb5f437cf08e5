"""kiln.conv2d for torch tensors, numpy arrays and CuPy arrays.

The output is allocated with the input's framework, on the input's device, in x's memory format:
channels-last (NHWC memory) when x's channel stride is 1 and C > 1, NCHW otherwise. CUDA work goes
on that framework's current stream. torch is never imported here.
"""

import numbers

from . import _C, _args
from ._C import InvalidArgumentError

# The least value of each of conv2d's int pairs, as F.conv2d takes them.
_PAIR_MINIMUM = {"stride": 1, "padding": 0, "dilation": 1}


def int_pair(name: str, value) -> tuple:
    """stride, padding or dilation as a pair of ints (h, w), each at least its minimum."""
    if isinstance(value, str):
        raise InvalidArgumentError(
            f"kiln::conv2d: {name} is '{value}', expected an int or a pair of ints "
            "(string paddings such as 'same' are not supported)"
        )
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    try:
        items = tuple(value)
    except TypeError:
        items = None
    if items is None or len(items) != 2:
        raise InvalidArgumentError(
            f"kiln::conv2d: {name} is {value!r}, expected an int or a pair of ints"
        )
    return tuple(_args.integer("conv2d", name, v, _PAIR_MINIMUM[name]) for v in items)


def _out_size(size, kernel, stride, padding, dilation) -> int:
    room = size + 2 * padding - dilation * (kernel - 1) - 1
    return room // stride + 1 if room >= 0 else 0


def conv2d_out_shape(x_shape, w_shape, stride, padding, dilation) -> tuple:
    """[N, OC, OH, OW] for x [N, C, H, W] and w [OC, C, KH, KW] (checked again by kiln)."""
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise InvalidArgumentError(
            f"kiln::conv2d: x has shape {_args.shape_str(x_shape)} and w "
            f"{_args.shape_str(w_shape)}, expected "
            "x [N, C, H, W] and w [OC, C, KH, KW]"
        )
    n, _, h, w = x_shape
    oc, _, kh, kw = w_shape
    return (
        n,
        oc,
        _out_size(h, kh, stride[0], padding[0], dilation[0]),
        _out_size(w, kw, stride[1], padding[1], dilation[1]),
    )


def channels_last(shape, strides) -> bool:
    """Whether x (strides in elements) is channels-last: the output takes the same format."""
    return len(shape) == 4 and shape[1] > 1 and strides[1] == 1


def out_strides(shape, nhwc: bool) -> tuple:
    n, c, h, w = shape
    if nhwc:
        return (h * w * c, 1, w * c, c)
    return (c * h * w, h * w, w, 1)


def conv2d(x, w, bias=None, *, stride=1, padding=0, dilation=1, groups=1, out_dtype=None):
    """2-D convolution following torch.nn.functional.conv2d (groups = 1).

    x: [N, C, H, W] f32/f16/bf16, NCHW or channels-last (any strides).
    w: [OC, C, KH, KW] f32/f16/bf16, any dtype pairing with x.
    bias: [OC] or None. stride, padding, dilation: an int or a pair (h, w).
    out_dtype: "f32"/"f16"/"bf16" or a framework dtype; default x's dtype.

    Returns [N, OC, OH, OW] in x's memory format. On CUDA, x and w are rounded to bf16 (f16 when
    neither is bf16 and one is f16) and accumulated in f32; on CPU, accumulated in f64. N = 0 or
    OC = 0 give an empty result; C, H, W and the kernel must be >= 1, as in torch.
    """
    stride, padding, dilation = (int_pair(name, value) for name, value in
                                 (("stride", stride), ("padding", padding), ("dilation", dilation)))
    groups = _args.integer("conv2d", "groups", groups)
    kind = _args.check_arrays("conv2d", x=x, w=w, bias=bias)
    if kind == "torch":
        from . import _torch_conv2d

        return _torch_conv2d.conv2d(x, w, bias, stride, padding, dilation, groups, out_dtype)

    n, oc, oh, ow = conv2d_out_shape(x.shape, w.shape, stride, padding, dilation)
    dtype = _args.numpy_out_dtype("conv2d", kind, out_dtype, x, "x")
    elements = tuple(s // x.itemsize for s in x.strides)
    if channels_last(x.shape, elements):
        out = _args.empty(kind, x, (n, oh, ow, oc), dtype).transpose(0, 3, 1, 2)
    else:
        out = _args.empty(kind, x, (n, oc, oh, ow), dtype)
    _C.conv2d(x, w, bias, out, stride, padding, dilation, groups, _args.stream(x, kind))
    return out
