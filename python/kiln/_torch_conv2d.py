"""kiln.conv2d as a torch operator (torch.ops.kiln.conv2d), with a fake kernel for torch.compile
that gives the output x's memory format (channels-last when x's channel stride is 1)."""

import torch

from . import _C, _args
from ._conv2d import channels_last, conv2d_out_shape, int_pair, out_strides
from ._torch import inference_only, torch_dtype

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define(
    "conv2d(Tensor x, Tensor w, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation,"
    " int groups, ScalarType? out_dtype) -> Tensor"
)


def _empty_out(x, w, stride, padding, dilation, out_dtype):
    # Checked again here for direct torch.ops.kiln.conv2d calls: the shape divides by the stride.
    stride, padding, dilation = (int_pair(name, value) for name, value in
                                 (("stride", stride), ("padding", padding), ("dilation", dilation)))
    shape = conv2d_out_shape(x.shape, w.shape, stride, padding, dilation)
    strides = out_strides(shape, channels_last(x.shape, x.stride()))
    return x.new_empty_strided(shape, strides, dtype=out_dtype or x.dtype)


def _conv2d_kernel(x, w, bias, stride, padding, dilation, groups, out_dtype):
    inference_only("conv2d", x=x, w=w, bias=bias)
    out = _empty_out(x, w, stride, padding, dilation, out_dtype)
    _C.conv2d(x, w, bias, out, tuple(stride), tuple(padding), tuple(dilation), groups,
              _args.stream(x, "torch"))
    return out


for _key in ("CPU", "CUDA"):
    _lib.impl("conv2d", _conv2d_kernel, _key)


@torch.library.register_fake("kiln::conv2d")
def _conv2d_fake(x, w, bias, stride, padding, dilation, groups, out_dtype):
    _args.same_device("conv2d", x=x, w=w, bias=bias)
    return _empty_out(x, w, stride, padding, dilation, out_dtype)


def conv2d(x, w, bias, stride, padding, dilation, groups, out_dtype):
    """kiln.conv2d for torch tensors: torch.ops.kiln.conv2d with out_dtype resolved."""
    return torch.ops.kiln.conv2d(x, w, bias, list(stride), list(padding), list(dilation), groups,
                                 torch_dtype("conv2d", out_dtype))
