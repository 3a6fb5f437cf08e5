"""Shared pieces of the row ops (the norm and activation families) for numpy and CuPy arrays:
the `quantize` argument, and the outputs of a call (a 16/32-bit array, or fp8 codes held as
uint8 with one f32 scale per row). torch tensors go through the torch custom ops instead
(_torch_rows.py). torch is never imported here.
"""

import numpy as np

from . import _args
from ._C import InvalidArgumentError
from ._matmul import fp8_format, rows_of


def quantize_format(op: str, quantize, out_dtype):
    """The fp8 format ("f8_e4m3fn", "f8_e5m2") of `quantize`, or None for a plain output.
    quantize and out_dtype exclude each other: a quantized output is fp8 by definition."""
    if quantize is None:
        return None
    if out_dtype is not None:
        raise InvalidArgumentError(
            f"kiln::{op}: out_dtype is {out_dtype} with quantize={quantize!r}, expected one of "
            "them: a quantized output is fp8 codes with per-row scales"
        )
    return fp8_format(op, "quantize", quantize)


def outputs(op: str, kind: str, x, shape, out_dtype, fmt):
    """(out, out_scale) of a numpy / CuPy call: out of `shape` (fp8 codes as uint8 with an f32
    scale [R] when fmt is set, else out_dtype or x's dtype and no scale). A row of no elements
    has scale 1 (the kernels write nothing there)."""
    if fmt is None:
        dtype = _args.numpy_out_dtype(op, kind, out_dtype, x, "x")
        return _args.empty(kind, x, shape, dtype), None
    out = _args.empty(kind, x, shape, np.uint8)
    scale = _args.empty(kind, x, (rows_of(op, "x", shape),), np.float32)
    if shape[-1] == 0:
        scale[...] = 1
    return out, scale
