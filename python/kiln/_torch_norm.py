"""The norm family as torch operators (torch.ops.kiln.rms_norm, rms_norm_fp8, layer_norm,
layer_norm_fp8, group_norm), with fake kernels for torch.compile. A quantized output is a
separate op (_fp8, returning codes and scales), so each op has one fixed output signature.

Defined in the "kiln" namespace with a FRAGMENT library (_torch.py holds the DEF), each with a
CPU and a CUDA kernel, as _torch.py explains.
"""

import torch

from . import _C, _torch  # noqa: F401  (_torch holds the namespace's DEF: load it first)
from ._torch_rows import FP8_DTYPES, fp8_outputs, fp8_outputs_fake, resolve_dtype, stream

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
    """An output in x's memory format: channels-last when x is channels-last and not
    NCHW-contiguous."""
    dtype = out_dtype or x.dtype
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        return torch.empty_like(x, dtype=dtype, memory_format=torch.channels_last)
    return x.new_empty(x.shape, dtype=dtype)


# ---- kernels -----------------------------------------------------------------------------------


def _rms_norm_kernel(x, weight, eps, out_dtype):
    out = x.new_empty(x.shape, dtype=out_dtype or x.dtype)
    _C.rms_norm(x, weight, out, None, eps, stream(x))
    return out


def _rms_norm_fp8_kernel(x, weight, eps, fmt):
    q, scale = fp8_outputs(x, x.shape, fmt)
    _C.rms_norm(x, weight, q, scale, eps, stream(x))
    return q, scale


def _layer_norm_kernel(x, weight, bias, shift, scale, eps, out_dtype):
    out = x.new_empty(x.shape, dtype=out_dtype or x.dtype)
    _C.layer_norm(x, weight, bias, shift, scale, out, None, eps, stream(x))
    return out


def _layer_norm_fp8_kernel(x, weight, bias, shift, scale, eps, fmt):
    q, q_scale = fp8_outputs(x, x.shape, fmt)
    _C.layer_norm(x, weight, bias, shift, scale, q, q_scale, eps, stream(x))
    return q, q_scale


def _group_norm_kernel(x, num_groups, weight, bias, eps, silu, out_dtype):
    out = _group_norm_out(x, out_dtype)
    _C.group_norm(x, num_groups, weight, bias, out, eps, silu, stream(x))
    return out


for _key in ("CPU", "CUDA"):
    _lib.impl("rms_norm", _rms_norm_kernel, _key)
    _lib.impl("rms_norm_fp8", _rms_norm_fp8_kernel, _key)
    _lib.impl("layer_norm", _layer_norm_kernel, _key)
    _lib.impl("layer_norm_fp8", _layer_norm_fp8_kernel, _key)
    _lib.impl("group_norm", _group_norm_kernel, _key)


@torch.library.register_fake("kiln::rms_norm")
def _rms_norm_fake(x, weight, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


@torch.library.register_fake("kiln::rms_norm_fp8")
def _rms_norm_fp8_fake(x, weight, eps, fmt):
    return fp8_outputs_fake(x, x.shape, fmt)


@torch.library.register_fake("kiln::layer_norm")
def _layer_norm_fake(x, weight, bias, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


@torch.library.register_fake("kiln::layer_norm_fp8")
def _layer_norm_fp8_fake(x, weight, bias, shift, scale, eps, fmt):
    return fp8_outputs_fake(x, x.shape, fmt)


@torch.library.register_fake("kiln::group_norm")
def _group_norm_fake(x, num_groups, weight, bias, eps, silu, out_dtype):
    return _group_norm_out(x, out_dtype)


# ---- wrappers: kiln.* for torch tensors --------------------------------------------------------


def rms_norm(x, weight, eps, out_dtype, fmt):
    if fmt is not None:
        return torch.ops.kiln.rms_norm_fp8(x, weight, float(eps), FP8_DTYPES[fmt])
    return torch.ops.kiln.rms_norm(x, weight, float(eps), resolve_dtype("rms_norm", out_dtype))


def layer_norm(x, weight, bias, shift, scale, eps, out_dtype, fmt):
    if fmt is not None:
        return torch.ops.kiln.layer_norm_fp8(x, weight, bias, shift, scale, float(eps),
                                             FP8_DTYPES[fmt])
    return torch.ops.kiln.layer_norm(x, weight, bias, shift, scale, float(eps),
                                     resolve_dtype("layer_norm", out_dtype))


def group_norm(x, num_groups, weight, bias, eps, silu, out_dtype):
    return torch.ops.kiln.group_norm(x, int(num_groups), weight, bias, float(eps), bool(silu),
                                     resolve_dtype("group_norm", out_dtype))
