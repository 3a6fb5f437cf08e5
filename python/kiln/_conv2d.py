"""kiln.conv2d for torch tensors, numpy arrays and CuPy arrays.

The output is allocated with the input's framework, on the input's device, in x's memory format:
channels-last (NHWC memory) when x's channel stride is 1 and C > 1, NCHW otherwise. CUDA work goes
on that framework's current stream. torch is never imported here.
"""

import sys

import numpy as np

from . import _C
from ._C import InvalidArgumentError
from .ops import dtype_name

_NUMPY_DTYPES = {"f32": np.float32, "f16": np.float16}


def _pair(name: str, value) -> tuple:
    if isinstance(value, str):
        raise InvalidArgumentError(
            f"kiln::conv2d: {name} is '{value}', expected an int or a pair of ints "
            "(string paddings such as 'same' are not supported)"
        )
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise InvalidArgumentError(
            f"kiln::conv2d: {name} is {value}, expected an int or a pair of ints"
        )
    return pair


def _out_size(size, kernel, stride, padding, dilation) -> int:
    room = size + 2 * padding - dilation * (kernel - 1) - 1
    return room // stride + 1 if room >= 0 else 0


def conv2d_out_shape(x_shape, w_shape, stride, padding, dilation) -> tuple:
    """[N, OC, OH, OW] for x [N, C, H, W] and w [OC, C, KH, KW] (checked again by kiln)."""
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise InvalidArgumentError(
            f"kiln::conv2d: x has shape {list(x_shape)} and w {list(w_shape)}, expected "
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
    neither is bf16 and one is f16) and accumulated in f32; on CPU, accumulated in f64.
    """
    stride, padding, dilation = _pair("stride", stride), _pair("padding", padding), _pair(
        "dilation", dilation
    )
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        from . import _torch_conv2d

        return _torch_conv2d.conv2d(x, w, bias, stride, padding, dilation, groups, out_dtype)

    shape = conv2d_out_shape(x.shape, w.shape, stride, padding, dilation)
    if isinstance(x, np.ndarray):
        name = dtype_name("conv2d", out_dtype if out_dtype is not None else x.dtype)
        if name not in _NUMPY_DTYPES:
            raise InvalidArgumentError(
                f"kiln::conv2d: out_dtype is {name}, which numpy has no type for; expected f32 "
                "or f16 (use torch for bf16)"
            )
        elements = tuple(s // x.itemsize for s in x.strides)
        out = _empty_numpy(shape, _NUMPY_DTYPES[name], channels_last(x.shape, elements))
        _C.conv2d(x, w, bias, out, stride, padding, dilation, groups, 0)
        return out

    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        dtype = out_dtype if out_dtype is not None else x.dtype
        elements = tuple(s // x.itemsize for s in x.strides)
        with x.device:
            n, oc, oh, ow = shape
            if channels_last(x.shape, elements):
                out = cupy.empty((n, oh, ow, oc), dtype=dtype).transpose(0, 3, 1, 2)
            else:
                out = cupy.empty(shape, dtype=dtype)
            _C.conv2d(x, w, bias, out, stride, padding, dilation, groups,
                      cupy.cuda.get_current_stream().ptr)
        return out

    raise InvalidArgumentError(
        f"kiln::conv2d: x is a {type(x).__module__}.{type(x).__qualname__}, expected a torch "
        "tensor, a numpy array or a CuPy array"
    )


def _empty_numpy(shape, dtype, nhwc: bool):
    n, oc, oh, ow = shape
    if nhwc:
        return np.empty((n, oh, ow, oc), dtype=dtype).transpose(0, 3, 1, 2)
    return np.empty(shape, dtype=dtype)
