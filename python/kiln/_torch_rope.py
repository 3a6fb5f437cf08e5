"""kiln.rope as torch operators (torch.ops.kiln.rope, and torch.ops.kiln.rope_cache, which
writes a KV cache in place), with fake kernels for torch.compile. Defined on the "kiln" library
as a fragment (the library itself is defined in _torch.py), with a CPU and a CUDA kernel, like
rope_flux; the kernels refuse tensors that need a gradient and the fake kernels a mix of devices,
as there."""

import torch

from . import _C, _args
from ._rope import out_shape
from ._torch import inference_only, torch_dtype  # its DEF first

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define(
    "rope(Tensor x, Tensor positions, float? theta, str style, Tensor? norm_weight, float eps,"
    " ScalarType? out_dtype) -> Tensor"
)
_lib.define(
    "rope_cache(Tensor x, Tensor positions, Tensor(a!) cache, float? theta, str style,"
    " Tensor? norm_weight, float eps) -> ()"
)


def _rope_kernel(x, positions, theta, style, norm_weight, eps, out_dtype):
    inference_only("rope", x=x, norm_weight=norm_weight)
    out = x.new_empty(out_shape(x.shape), dtype=out_dtype or x.dtype)
    _C.rope(x, positions, out, theta, style, norm_weight, eps, False, _args.stream(x, "torch"))
    return out


def _rope_cache_kernel(x, positions, cache, theta, style, norm_weight, eps):
    inference_only("rope_cache", x=x, norm_weight=norm_weight, cache=cache)
    _C.rope(x, positions, cache, theta, style, norm_weight, eps, True, _args.stream(x, "torch"))


for _key in ("CPU", "CUDA"):
    _lib.impl("rope", _rope_kernel, _key)
    _lib.impl("rope_cache", _rope_cache_kernel, _key)


@torch.library.register_fake("kiln::rope")
def _rope_fake(x, positions, theta, style, norm_weight, eps, out_dtype):
    _args.same_device("rope", x=x, positions=positions, norm_weight=norm_weight)
    return x.new_empty(out_shape(x.shape), dtype=out_dtype or x.dtype)


@torch.library.register_fake("kiln::rope_cache")
def _rope_cache_fake(x, positions, cache, theta, style, norm_weight, eps):
    _args.same_device("rope_cache", x=x, positions=positions, norm_weight=norm_weight,
                      cache=cache)
    return None


def rope(x, positions, theta, style, norm_weight, eps, cache, out_dtype):
    """kiln.rope for torch tensors (checked by kiln.rope): torch.ops.kiln.rope, or rope_cache when
    a cache is given."""
    if cache is not None:
        torch.ops.kiln.rope_cache(x, positions, cache, theta, style, norm_weight, eps)
        return None
    return torch.ops.kiln.rope(x, positions, theta, style, norm_weight, eps,
                               torch_dtype("rope", out_dtype))
