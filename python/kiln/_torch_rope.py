"""kiln.rope as torch operators (torch.ops.kiln.rope, and torch.ops.kiln.rope_cache, which
writes a KV cache in place), with fake kernels for torch.compile. Defined on the "kiln" library
as a fragment (the library itself is defined in _torch.py), with a CPU and a CUDA kernel, like
rope_flux."""

import torch

from . import _C
from . import _torch  # noqa: F401  (defines the "kiln" library first)
from ._rope import out_shape
from ._torch import torch_dtype

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define(
    "rope(Tensor x, Tensor positions, float? theta, str style, Tensor? norm_weight, float eps,"
    " ScalarType? out_dtype) -> Tensor"
)
_lib.define(
    "rope_cache(Tensor x, Tensor positions, Tensor(a!) cache, float? theta, str style,"
    " Tensor? norm_weight, float eps) -> ()"
)


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


def _rope_kernel(x, positions, theta, style, norm_weight, eps, out_dtype):
    out = x.new_empty(out_shape(x.shape), dtype=out_dtype or x.dtype)
    _C.rope(x, positions, out, theta, style, norm_weight, eps, False, _stream(x))
    return out


def _rope_cache_kernel(x, positions, cache, theta, style, norm_weight, eps):
    _C.rope(x, positions, cache, theta, style, norm_weight, eps, True, _stream(x))


for _key in ("CPU", "CUDA"):
    _lib.impl("rope", _rope_kernel, _key)
    _lib.impl("rope_cache", _rope_cache_kernel, _key)


@torch.library.register_fake("kiln::rope")
def _rope_fake(x, positions, theta, style, norm_weight, eps, out_dtype):
    return x.new_empty(out_shape(x.shape), dtype=out_dtype or x.dtype)


@torch.library.register_fake("kiln::rope_cache")
def _rope_cache_fake(x, positions, cache, theta, style, norm_weight, eps):
    return None


def rope(x, positions, theta, style, norm_weight, eps, cache, out_dtype):
    """kiln.rope for torch tensors: torch.ops.kiln.rope, or rope_cache when a cache is given."""
    if cache is not None:
        if out_dtype is not None:
            raise _C.InvalidArgumentError(
                "kiln::rope_cache: out_dtype is given with a cache, expected None (the cache's "
                "dtype is the output's)"
            )
        torch.ops.kiln.rope_cache(x, positions, cache, theta, style, norm_weight, float(eps))
        return None
    return torch.ops.kiln.rope(x, positions, theta, style, norm_weight, float(eps),
                               torch_dtype("rope", out_dtype))
