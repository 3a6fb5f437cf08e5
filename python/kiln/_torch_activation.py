"""The activation family as torch operators (torch.ops.kiln.glu, glu_fp8, gelu_tanh,
gelu_tanh_fp8), with fake kernels for torch.compile. A quantized output is a separate op (_fp8,
returning codes and scales), so each op has one fixed output signature.

Defined in the "kiln" namespace with a FRAGMENT library (_torch.py holds the DEF), each with a
CPU and a CUDA kernel, as _torch.py explains.
"""

import torch

from . import _C, _torch  # noqa: F401  (_torch holds the namespace's DEF: load it first)
from ._activation import glu_out_shape
from ._torch_rows import FP8_DTYPES, fp8_outputs, fp8_outputs_fake, resolve_dtype, stream

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define("glu(Tensor x, str activation, ScalarType? out_dtype) -> Tensor")
_lib.define("glu_fp8(Tensor x, str activation, ScalarType fmt) -> (Tensor, Tensor)")
_lib.define("gelu_tanh(Tensor x, ScalarType? out_dtype) -> Tensor")
_lib.define("gelu_tanh_fp8(Tensor x, ScalarType fmt) -> (Tensor, Tensor)")


def _glu_kernel(x, activation, out_dtype):
    out = x.new_empty(glu_out_shape(x.shape), dtype=out_dtype or x.dtype)
    _C.glu(x, out, None, activation, stream(x))
    return out


def _glu_fp8_kernel(x, activation, fmt):
    q, scale = fp8_outputs(x, glu_out_shape(x.shape), fmt)
    _C.glu(x, q, scale, activation, stream(x))
    return q, scale


def _gelu_tanh_kernel(x, out_dtype):
    out = x.new_empty(x.shape, dtype=out_dtype or x.dtype)
    _C.gelu_tanh(x, out, None, stream(x))
    return out


def _gelu_tanh_fp8_kernel(x, fmt):
    q, scale = fp8_outputs(x, x.shape, fmt)
    _C.gelu_tanh(x, q, scale, stream(x))
    return q, scale


for _key in ("CPU", "CUDA"):
    _lib.impl("glu", _glu_kernel, _key)
    _lib.impl("glu_fp8", _glu_fp8_kernel, _key)
    _lib.impl("gelu_tanh", _gelu_tanh_kernel, _key)
    _lib.impl("gelu_tanh_fp8", _gelu_tanh_fp8_kernel, _key)


@torch.library.register_fake("kiln::glu")
def _glu_fake(x, activation, out_dtype):
    return x.new_empty(glu_out_shape(x.shape), dtype=out_dtype or x.dtype)


@torch.library.register_fake("kiln::glu_fp8")
def _glu_fp8_fake(x, activation, fmt):
    return fp8_outputs_fake(x, glu_out_shape(x.shape), fmt)


@torch.library.register_fake("kiln::gelu_tanh")
def _gelu_tanh_fake(x, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


@torch.library.register_fake("kiln::gelu_tanh_fp8")
def _gelu_tanh_fp8_fake(x, fmt):
    return fp8_outputs_fake(x, x.shape, fmt)


def glu(x, activation, out_dtype, fmt):
    if fmt is not None:
        return torch.ops.kiln.glu_fp8(x, activation, FP8_DTYPES[fmt])
    return torch.ops.kiln.glu(x, activation, resolve_dtype("glu", out_dtype))


def gelu_tanh(x, out_dtype, fmt):
    if fmt is not None:
        return torch.ops.kiln.gelu_tanh_fp8(x, FP8_DTYPES[fmt])
    return torch.ops.kiln.gelu_tanh(x, resolve_dtype("gelu_tanh", out_dtype))
