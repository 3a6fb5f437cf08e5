"""kiln ops as torch operators (torch.ops.kiln.*), with fake kernels for torch.compile, and what
every op's torch layer shares: the dtype table and the checks its kernels run.

Imported on the first call with a torch tensor, or by `import kiln` when torch is loaded first.

The ops are defined with torch.library.Library and a CPU and a CUDA kernel rather than with
torch.library.custom_op: on torch 2.11 that halves the host time of an eager call (13 µs against
24 µs for a small rope_flux on CPU), which matters next to a 20 µs kernel.

kiln ops have no backward. The kernels refuse a tensor that requires grad under grad mode (a
direct torch.ops.kiln call would otherwise return a graph that drops the gradient), and the fake
kernels refuse a mix of meta and real tensors (the dispatcher sends such a call to them, and it
would return uninitialized memory); kiln.* checks both before it calls an op (_args).
"""

import torch

from . import _C, _args
from .ops import rope_flux_out_shape

TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
FP8_DTYPES = {"f8_e4m3fn": torch.float8_e4m3fn, "f8_e5m2": torch.float8_e5m2}


def torch_dtype(op: str, dtype) -> torch.dtype | None:
    """out_dtype as a torch dtype of kiln's outputs (f32, f16, bf16); None stays None."""
    return None if dtype is None else TORCH_DTYPES[_args.dtype_name(op, dtype)]


def inference_only(op: str, **tensors) -> None:
    """A kernel's check that no tensor needs a gradient (see the module's note)."""
    for name, t in tensors.items():
        if t is not None:
            _args.no_grad_needed(op, name, t)


_lib = torch.library.Library("kiln", "DEF")
_lib.define(
    "rope_flux(Tensor x, Tensor? pe, Tensor? norm_weight, float eps, ScalarType? out_dtype)"
    " -> Tensor"
)
# The out variant writes into a given [N, H, L, D] tensor (a row range of a joint text + image
# attention input); a mutating op, which torch.compile functionalizes.
_lib.define(
    "rope_flux_out(Tensor x, Tensor? pe, Tensor? norm_weight, float eps, Tensor(a!) out) -> ()"
)


def _rope_flux_kernel(x, pe, norm_weight, eps, out_dtype):
    inference_only("rope_flux", x=x, pe=pe, norm_weight=norm_weight)
    out = x.new_empty(rope_flux_out_shape(x.shape), dtype=out_dtype or x.dtype)
    _C.rope_flux(x, pe, out, norm_weight, eps, _args.stream(x, "torch"))
    return out


def _rope_flux_out_kernel(x, pe, norm_weight, eps, out):
    inference_only("rope_flux", x=x, pe=pe, norm_weight=norm_weight, out=out)
    _C.rope_flux(x, pe, out, norm_weight, eps, _args.stream(x, "torch"))


for _key in ("CPU", "CUDA"):
    _lib.impl("rope_flux", _rope_flux_kernel, _key)
    _lib.impl("rope_flux_out", _rope_flux_out_kernel, _key)


@torch.library.register_fake("kiln::rope_flux")
def _rope_flux_fake(x, pe, norm_weight, eps, out_dtype):
    _args.same_device("rope_flux", x=x, pe=pe, norm_weight=norm_weight)
    return x.new_empty(rope_flux_out_shape(x.shape), dtype=out_dtype or x.dtype)


@torch.library.register_fake("kiln::rope_flux_out")
def _rope_flux_out_fake(x, pe, norm_weight, eps, out):
    _args.same_device("rope_flux", x=x, pe=pe, norm_weight=norm_weight, out=out)
    return None


def rope_flux(x, pe, norm_weight, eps, out_dtype):
    """kiln.rope_flux for torch tensors: torch.ops.kiln.rope_flux with out_dtype resolved."""
    return torch.ops.kiln.rope_flux(x, pe, norm_weight, eps, torch_dtype("rope_flux", out_dtype))


def rope_flux_out(x, pe, norm_weight, eps, out):
    """kiln.rope_flux(..., out=out) for torch tensors: writes out and returns it."""
    torch.ops.kiln.rope_flux_out(x, pe, norm_weight, eps, out)
    return out
