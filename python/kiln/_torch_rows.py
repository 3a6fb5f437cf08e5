"""Shared pieces of the row ops' torch custom ops (_torch_norm.py, _torch_activation.py)."""

import math

import torch

from ._torch import torch_dtype

FP8_DTYPES = {"f8_e4m3fn": torch.float8_e4m3fn, "f8_e5m2": torch.float8_e5m2}


def stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


def resolve_dtype(op: str, dtype):
    """out_dtype as a torch dtype (None stays None: the op's default)."""
    return torch_dtype(op, dtype)


def fp8_outputs(like: torch.Tensor, shape, fmt: torch.dtype):
    """(q, scale): fp8 codes of `shape` and f32 [R] scales (R = the product of the leading dims;
    1 where a row has no elements: the kernels write nothing there)."""
    q = like.new_empty(shape, dtype=fmt)
    rows = math.prod(shape[:-1])
    if shape[-1] == 0:
        return q, like.new_ones((rows,), dtype=torch.float32)
    return q, like.new_empty((rows,), dtype=torch.float32)


def fp8_outputs_fake(like: torch.Tensor, shape, fmt: torch.dtype):
    return like.new_empty(shape, dtype=fmt), like.new_empty((math.prod(shape[:-1]),),
                                                           dtype=torch.float32)
