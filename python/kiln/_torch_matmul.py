"""kiln's quantized-matmul ops as torch operators (torch.ops.kiln.*), with fake kernels for
torch.compile.

Imported on the first call with a torch tensor, or by `import kiln` when torch is loaded first.
Defined in the "kiln" namespace with a FRAGMENT library (the rope op's _torch.py holds the one
DEF), each with a CPU and a CUDA kernel, as _torch.py explains. The ops take 2-D operands; the
Python wrappers below flatten leading dims around them, so the fake kernels stay simple.

prepare_weight is not an op: it runs once per weight, outside any graph, and returns a Python
object (kiln.PreparedWeight) whose layout strings an op could not return.
"""

import torch

from . import _C, _args
from ._matmul import (
    Q8_0_BYTES,
    Q8_0_BLOCK,
    WeightSpec,
    as_rows,
    fp8_format,
    q8_0_bytes_per_row,
    q8_0_cols,
    scale_shape,
)
from ._torch import FP8_DTYPES, TORCH_DTYPES, inference_only, torch_dtype  # its DEF first

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define("quantize_fp8(Tensor x, ScalarType fmt, str granularity) -> (Tensor, Tensor)")
_lib.define(
    "quantize_fp8_scaled(Tensor x, Tensor scale, ScalarType fmt, str granularity) -> Tensor"
)
_lib.define("quantize_q8_0(Tensor x) -> Tensor")
_lib.define("dequantize(Tensor q, Tensor? scale, ScalarType out_dtype) -> Tensor")
_lib.define(
    "matmul(Tensor a, Tensor w, str w_format, int n, int k, Tensor? w_scale, str w_layout,"
    " Tensor? a_scale, Tensor? bias, ScalarType out_dtype, str path, Tensor? gate=None,"
    " Tensor? residual=None) -> Tensor"
)


# ---- kernels (x, q, a are 2-D here) ---------------------------------------------------------


def _quantize_fp8_kernel(x, fmt, granularity):
    inference_only("quantize_fp8", x=x)
    q = torch.empty(x.shape, dtype=fmt, device=x.device)
    # An empty x has no element in any group: amax 0, so scale 1 (the op writes nothing then).
    new_scale = torch.ones if x.numel() == 0 else torch.empty
    scale = new_scale(scale_shape(granularity, *x.shape), dtype=torch.float32, device=x.device)
    _C.quantize_fp8(x, q, scale, granularity, True, _args.stream(x, "torch"))
    return q, scale


def _quantize_fp8_scaled_kernel(x, scale, fmt, granularity):
    inference_only("quantize_fp8", x=x, scale=scale)
    q = torch.empty(x.shape, dtype=fmt, device=x.device)
    _C.quantize_fp8(x, q, scale, granularity, False, _args.stream(x, "torch"))
    return q


def _quantize_q8_0_kernel(x):
    inference_only("quantize_q8_0", x=x)
    q = torch.empty((x.shape[0], q8_0_bytes_per_row("quantize_q8_0", x.shape[1])),
                    dtype=torch.uint8, device=x.device)
    _C.quantize_q8_0(x, q, _args.stream(x, "torch"))
    return q


def _dequantized_shape(q):
    if q.dtype == torch.uint8:
        return (q.shape[0], q8_0_cols("dequantize", "q", q.shape[1]))
    return tuple(q.shape)


def _dequantize_kernel(q, scale, out_dtype):
    inference_only("dequantize", q=q, scale=scale)
    out = torch.empty(_dequantized_shape(q), dtype=out_dtype, device=q.device)
    _C.dequantize(q, scale, out, _args.stream(q, "torch"))
    return out


def _matmul_kernel(a, w, w_format, n, k, w_scale, w_layout, a_scale, bias, out_dtype, path,
                   gate=None, residual=None):
    inference_only("matmul", a=a, w=w, w_scale=w_scale, a_scale=a_scale, bias=bias, gate=gate,
                   residual=residual)
    out = torch.empty((a.shape[0], n), dtype=out_dtype, device=a.device)
    _C.matmul(a, w, w_format, n, k, w_scale, w_layout, out, a_scale, bias, path,
              _args.stream(a, "torch"), gate=gate, residual=residual)
    return out


for _key in ("CPU", "CUDA"):
    _lib.impl("quantize_fp8", _quantize_fp8_kernel, _key)
    _lib.impl("quantize_fp8_scaled", _quantize_fp8_scaled_kernel, _key)
    _lib.impl("quantize_q8_0", _quantize_q8_0_kernel, _key)
    _lib.impl("dequantize", _dequantize_kernel, _key)
    _lib.impl("matmul", _matmul_kernel, _key)


@torch.library.register_fake("kiln::quantize_fp8")
def _quantize_fp8_fake(x, fmt, granularity):
    rows, cols = x.shape
    return (x.new_empty(x.shape, dtype=fmt),
            x.new_empty(scale_shape(granularity, rows, cols), dtype=torch.float32))


@torch.library.register_fake("kiln::quantize_fp8_scaled")
def _quantize_fp8_scaled_fake(x, scale, fmt, granularity):
    _args.same_device("quantize_fp8", x=x, scale=scale)
    return x.new_empty(x.shape, dtype=fmt)


@torch.library.register_fake("kiln::quantize_q8_0")
def _quantize_q8_0_fake(x):
    return x.new_empty((x.shape[0], x.shape[1] // Q8_0_BLOCK * Q8_0_BYTES), dtype=torch.uint8)


@torch.library.register_fake("kiln::dequantize")
def _dequantize_fake(q, scale, out_dtype):
    _args.same_device("dequantize", q=q, scale=scale)
    if q.dtype == torch.uint8:
        return q.new_empty((q.shape[0], q.shape[1] // Q8_0_BYTES * Q8_0_BLOCK), dtype=out_dtype)
    return q.new_empty(q.shape, dtype=out_dtype)


@torch.library.register_fake("kiln::matmul")
def _matmul_fake(a, w, w_format, n, k, w_scale, w_layout, a_scale, bias, out_dtype, path,
                 gate=None, residual=None):
    _args.same_device("matmul", a=a, w=w, w_scale=w_scale, a_scale=a_scale, bias=bias, gate=gate,
                      residual=residual)
    return a.new_empty((a.shape[0], n), dtype=out_dtype)


# ---- wrappers: kiln.* for torch tensors ------------------------------------------------------


def quantize_fp8(x, fmt_name: str, granularity: str, scale):
    """kiln.quantize_fp8 for torch tensors: [..., C] read as [R, C]; scale None or an f32
    tensor."""
    x2 = as_rows(x)
    fmt = FP8_DTYPES[fmt_name]
    if scale is None:
        q, scale = torch.ops.kiln.quantize_fp8(x2, fmt, granularity)
    else:
        q = torch.ops.kiln.quantize_fp8_scaled(x2, scale, fmt, granularity)
    return q.reshape(x.shape), scale


def quantize_q8_0(x):
    """kiln.quantize_q8_0 for torch tensors: [..., C] -> uint8 [..., C / 32 * 34]."""
    q = torch.ops.kiln.quantize_q8_0(as_rows(x))
    return q.reshape(*x.shape[:-1], q.shape[-1])


def dequantize(q, scale, out_dtype, q_fmt: str):
    """kiln.dequantize for torch tensors, scale None or an f32 tensor; q_fmt is "q8_0" or q's fp8
    format (uint8 fp8 bytes are viewed as their float8 dtype, no copy)."""
    if q_fmt != "q8_0" and q.dtype == torch.uint8:
        q = q.view(FP8_DTYPES[fp8_format("dequantize", "fmt", q_fmt)])
    out = torch.ops.kiln.dequantize(as_rows(q), scale,
                                    torch_dtype("dequantize", out_dtype))
    return out.reshape(*q.shape[:-1], out.shape[-1])


def matmul(a, spec: WeightSpec, a_scale, bias, out_dtype, path: str, gate=None, residual=None):
    """kiln.matmul for a 2-D torch a, a WeightSpec, a_scale None or an f32 tensor, and residual
    [M, N] or None."""
    if out_dtype is None:
        out_dtype = a.dtype if a.dtype in TORCH_DTYPES.values() else torch.bfloat16
    else:
        out_dtype = torch_dtype("matmul", out_dtype)
    if a.dim() == 2 and a.shape[1] > 0 and a.stride(1) != 1:
        a = a.contiguous()  # kiln reads rows with unit column stride
    return torch.ops.kiln.matmul(a, spec.data, spec.format, spec.n, spec.k, spec.scale,
                                 spec.layout, a_scale, bias, out_dtype, path, gate, residual)
