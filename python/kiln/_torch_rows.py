"""Shared pieces of the row ops' torch custom ops (_torch_norm.py, _torch_activation.py): their
fp8 outputs."""

import torch

from ._matmul import rows_of


def fp8_outputs(op: str, like: torch.Tensor, shape, fmt: torch.dtype):
    """(q, scale): fp8 codes of `shape` and f32 [R] scales (R = the product of the leading dims;
    1 where a row has no elements: the kernels write nothing there)."""
    q = like.new_empty(shape, dtype=fmt)
    rows = rows_of(op, "x", shape)
    if shape[-1] == 0:
        return q, like.new_ones((rows,), dtype=torch.float32)
    return q, like.new_empty((rows,), dtype=torch.float32)


def fp8_outputs_fake(op: str, like: torch.Tensor, shape, fmt: torch.dtype):
    return like.new_empty(shape, dtype=fmt), like.new_empty((rows_of(op, "x", shape),),
                                                           dtype=torch.float32)
