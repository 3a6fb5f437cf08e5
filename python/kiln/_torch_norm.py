"""The norm family as torch operators (torch.ops.kiln.rms_norm, rms_norm_fp8, layer_norm,
layer_norm_fp8, group_norm), with fake kernels for torch.compile. A quantized output is a
separate op (_fp8, returning codes and scales), so each op has one fixed output signature.

Defined in the "kiln" namespace with a FRAGMENT library (_torch.py holds the DEF), each with a
CPU and a CUDA kernel, as _torch.py explains; the kernels refuse tensors that need a gradient and
the fake kernels a mix of devices, as there.
"""

import torch

from . import _C, _args
from ._conv2d import channels_last, out_strides
from ._torch import FP8_DTYPES, inference_only, torch_dtype  # its DEF first
from ._torch_rows import fp8_outputs, fp8_outputs_fake

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define("rms_norm(Tensor x, Tensor? weight, float eps, ScalarType? out_dtype) -> Tensor")
_lib.define("rms_norm_fp8(Tensor x, Tensor? weight, float eps, ScalarType fmt) -> (Tensor, Tensor)")
_lib.define(
    "layer_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, Tensor? scale, float eps,"
    " ScalarType? out_dtype) -> Tensor"
)
_lib.define(
    "layer_norm_fp8(Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, Tensor? scale,"
    " float eps, ScalarType fmt) -> (Tensor, Tensor)"
)
_lib.define(
    "group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu,"
    " ScalarType? out_dtype) -> Tensor"
)


def _group_norm_out(x, out_dtype):
    """An output in x's memory format (conv2d's rule: channels-last when x's channel stride is
    1)."""
    if x.dim() != 4:
        return x.new_empty(x.shape, dtype=out_dtype or x.dtype)  # refused by the op
    return x.new_empty_strided(x.shape, out_strides(x.shape, channels_last(x.shape, x.stride())),
                               dtype=out_dtype or x.dtype)


# ---- kernels -----------------------------------------------------------------------------------


def _rms_norm_kernel(x, weight, eps, out_dtype):
    inference_only("rms_norm", x=x, weight=weight)
    out = x.new_empty(x.shape, dtype=out_dtype or x.dtype)
    _C.rms_norm(x, weight, out, None, eps, _args.stream(x, "torch"))
    return out


def _rms_norm_fp8_kernel(x, weight, eps, fmt):
    inference_only("rms_norm", x=x, weight=weight)
    q, scale = fp8_outputs("rms_norm", x, x.shape, fmt)
    _C.rms_norm(x, weight, q, scale, eps, _args.stream(x, "torch"))
    return q, scale


def _layer_norm_kernel(x, weight, bias, shift, scale, eps, out_dtype):
    inference_only("layer_norm", x=x, weight=weight, bias=bias, shift=shift, scale=scale)
    out = x.new_empty(x.shape, dtype=out_dtype or x.dtype)
    _C.layer_norm(x, weight, bias, shift, scale, out, None, eps, _args.stream(x, "torch"))
    return out


def _layer_norm_fp8_kernel(x, weight, bias, shift, scale, eps, fmt):
    inference_only("layer_norm", x=x, weight=weight, bias=bias, shift=shift, scale=scale)
    q, q_scale = fp8_outputs("layer_norm", x, x.shape, fmt)
    _C.layer_norm(x, weight, bias, shift, scale, q, q_scale, eps, _args.stream(x, "torch"))
    return q, q_scale


def _group_norm_kernel(x, num_groups, weight, bias, eps, silu, out_dtype):
    inference_only("group_norm", x=x, weight=weight, bias=bias)
    out = _group_norm_out(x, out_dtype)
    _C.group_norm(x, num_groups, weight, bias, out, eps, silu, _args.stream(x, "torch"))
    return out


for _key in ("CPU", "CUDA"):
    _lib.impl("rms_norm", _rms_norm_kernel, _key)
    _lib.impl("rms_norm_fp8", _rms_norm_fp8_kernel, _key)
    _lib.impl("layer_norm", _layer_norm_kernel, _key)
    _lib.impl("layer_norm_fp8", _layer_norm_fp8_kernel, _key)
    _lib.impl("group_norm", _group_norm_kernel, _key)


@torch.library.register_fake("kiln::rms_norm")
def _rms_norm_fake(x, weight, eps, out_dtype):
    _args.same_device("rms_norm", x=x, weight=weight)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


@torch.library.register_fake("kiln::rms_norm_fp8")
def _rms_norm_fp8_fake(x, weight, eps, fmt):
    _args.same_device("rms_norm", x=x, weight=weight)
    return fp8_outputs_fake("rms_norm", x, x.shape, fmt)


@torch.library.register_fake("kiln::layer_norm")
def _layer_norm_fake(x, weight, bias, shift, scale, eps, out_dtype):
    _args.same_device("layer_norm", x=x, weight=weight, bias=bias, shift=shift, scale=scale)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


@torch.library.register_fake("kiln::layer_norm_fp8")
def _layer_norm_fp8_fake(x, weight, bias, shift, scale, eps, fmt):
    _args.same_device("layer_norm", x=x, weight=weight, bias=bias, shift=shift, scale=scale)
    return fp8_outputs_fake("layer_norm", x, x.shape, fmt)


@torch.library.register_fake("kiln::group_norm")
def _group_norm_fake(x, num_groups, weight, bias, eps, silu, out_dtype):
    _args.same_device("group_norm", x=x, weight=weight, bias=bias)
    return _group_norm_out(x, out_dtype)


# ---- wrappers: kiln.* for torch tensors (checked by kiln.*) ------------------------------------


def rms_norm(x, weight, eps, out_dtype, fmt):
    if fmt is not None:
        return torch.ops.kiln.rms_norm_fp8(x, weight, eps, FP8_DTYPES[fmt])
    return torch.ops.kiln.rms_norm(x, weight, eps, torch_dtype("rms_norm", out_dtype))


def layer_norm(x, weight, bias, shift, scale, eps, out_dtype, fmt):
    if fmt is not None:
        return torch.ops.kiln.layer_norm_fp8(x, weight, bias, shift, scale, eps, FP8_DTYPES[fmt])
    return torch.ops.kiln.layer_norm(x, weight, bias, shift, scale, eps,
                                     torch_dtype("layer_norm", out_dtype))


def group_norm(x, num_groups, weight, bias, eps, silu, out_dtype):
    return torch.ops.kiln.group_norm(x, num_groups, weight, bias, eps, silu,
                                     torch_dtype("group_norm", out_dtype))
