"""kiln.conv2d as a torch operator (torch.ops.kiln.conv2d), with a fake kernel for torch.compile
that gives the output x's memory format (channels-last when x's channel stride is 1)."""

import torch

from . import _C
from ._conv2d import channels_last, conv2d_out_shape, out_strides
from .ops import dtype_name

_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define(
    "conv2d(Tensor x, Tensor w, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation,"
    " int groups, ScalarType? out_dtype) -> Tensor"
)


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


def _empty_out(x, w, stride, padding, dilation, out_dtype):
    shape = conv2d_out_shape(x.shape, w.shape, stride, padding, dilation)
    strides = out_strides(shape, channels_last(x.shape, x.stride()))
    return x.new_empty_strided(shape, strides, dtype=out_dtype or x.dtype)


def _conv2d_kernel(x, w, bias, stride, padding, dilation, groups, out_dtype):
    out = _empty_out(x, w, stride, padding, dilation, out_dtype)
    _C.conv2d(x, w, bias, out, tuple(stride), tuple(padding), tuple(dilation), groups, _stream(x))
    return out


for _key in ("CPU", "CUDA"):
    _lib.impl("conv2d", _conv2d_kernel, _key)


@torch.library.register_fake("kiln::conv2d")
def _conv2d_fake(x, w, bias, stride, padding, dilation, groups, out_dtype):
    return _empty_out(x, w, stride, padding, dilation, out_dtype)


def conv2d(x, w, bias, stride, padding, dilation, groups, out_dtype):
    """kiln.conv2d for torch tensors: torch.ops.kiln.conv2d with out_dtype resolved."""
    if out_dtype is not None and not isinstance(out_dtype, torch.dtype):
        out_dtype = _TORCH_DTYPES[dtype_name("conv2d", out_dtype)]
    return torch.ops.kiln.conv2d(
        x, w, bias, list(stride), list(padding), list(dilation), int(groups), out_dtype
    )
