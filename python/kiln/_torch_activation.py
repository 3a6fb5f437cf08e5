"""The activation family as torch operators (torch.ops.kiln.glu, glu_fp8, gelu_tanh,
gelu_tanh_fp8), with fake kernels for torch.compile. A quantized output is a separate op (_fp8,
returning codes and scales), so each op has one fixed output signature.

Defined in the "kiln" namespace with a FRAGMENT library (_torch.py holds the DEF), each with a
CPU and a CUDA kernel, as _torch.py explains; the kernels refuse tensors that need a gradient, as
there.
"""

import torch

from . import _C, _args
from ._activation import glu_out_shape
from ._torch import FP8_DTYPES, inference_only, torch_dtype  # its DEF first
from ._torch_rows import fp8_outputs, fp8_outputs_fake

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define("glu(Tensor x, str activation, ScalarType? out_dtype) -> Tensor")
_lib.define("glu_fp8(Tensor x, str activation, ScalarType fmt) -> (Tensor, Tensor)")
_lib.define("gelu_tanh(Tensor x, ScalarType? out_dtype) -> Tensor")
_lib.define("gelu_tanh_fp8(Tensor x, ScalarType fmt) -> (Tensor, Tensor)")


def _glu_kernel(x, activation, out_dtype):
    inference_only("glu", x=x)
    out = x.new_empty(glu_out_shape(x.shape), dtype=out_dtype or x.dtype)
    _C.glu(x, out, None, activation, _args.stream(x, "torch"))
    return out


def _glu_fp8_kernel(x, activation, fmt):
    inference_only("glu", x=x)
    q, scale = fp8_outputs("glu", x, glu_out_shape(x.shape), fmt)
    _C.glu(x, q, scale, activation, _args.stream(x, "torch"))
    return q, scale


def _gelu_tanh_kernel(x, out_dtype):
    inference_only("gelu_tanh", x=x)
    out = x.new_empty(x.shape, dtype=out_dtype or x.dtype)
    _C.gelu_tanh(x, out, None, _args.stream(x, "torch"))
    return out


def _gelu_tanh_fp8_kernel(x, fmt):
    inference_only("gelu_tanh", x=x)
    q, scale = fp8_outputs("gelu_tanh", x, x.shape, fmt)
    _C.gelu_tanh(x, q, scale, _args.stream(x, "torch"))
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
    return fp8_outputs_fake("glu", x, glu_out_shape(x.shape), fmt)


@torch.library.register_fake("kiln::gelu_tanh")
def _gelu_tanh_fake(x, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


@torch.library.register_fake("kiln::gelu_tanh_fp8")
def _gelu_tanh_fp8_fake(x, fmt):
    return fp8_outputs_fake("gelu_tanh", x, x.shape, fmt)


# ---- wrappers: kiln.* for torch tensors (checked by kiln.*) ------------------------------------


def glu(x, activation, out_dtype, fmt):
    if fmt is not None:
        return torch.ops.kiln.glu_fp8(x, activation, FP8_DTYPES[fmt])
    return torch.ops.kiln.glu(x, activation, torch_dtype("glu", out_dtype))


def gelu_tanh(x, out_dtype, fmt):
    if fmt is not None:
        return torch.ops.kiln.gelu_tanh_fp8(x, FP8_DTYPES[fmt])
    return torch.ops.kiln.gelu_tanh(x, torch_dtype("gelu_tanh", out_dtype))
