"""kiln.attention as a torch operator (torch.ops.kiln.attention), with a fake kernel for
torch.compile. Defined on the "kiln" library as a fragment (the library itself is defined in
_torch.py), with a CPU and a CUDA kernel, like rope_flux."""

import torch

from . import _C, _args
from ._attention import out_shapes
from ._torch import inference_only

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, bool causal, float? scale, Tensor? mask,"
    " Tensor? kv_len, float? softcap, bool return_lse) -> (Tensor, Tensor)"
)
# The out variant writes a given [N, Hq, Lq, Dv] tensor (a strided view: the output projection's
# [N, Lq, Hq * Dv] input seen transposed) and returns lse; a mutating op, which torch.compile
# functionalizes.
_lib.define(
    "attention_out(Tensor q, Tensor k, Tensor v, bool causal, float? scale, Tensor? mask,"
    " Tensor? kv_len, float? softcap, bool return_lse, Tensor(a!) out) -> Tensor"
)


def _lse(q, v, return_lse):
    _, lse_shape = out_shapes(q.shape, v.shape)
    return q.new_empty(lse_shape if return_lse else (0,), dtype=torch.float32)


def _outputs(q, v, return_lse):
    out_shape, _ = out_shapes(q.shape, v.shape)
    return q.new_empty(out_shape), _lse(q, v, return_lse)


def _attention_kernel(q, k, v, causal, scale, mask, kv_len, softcap, return_lse):
    inference_only("attention", q=q, k=k, v=v, mask=mask)
    out, lse = _outputs(q, v, return_lse)
    _C.attention(q, k, v, out, causal, scale, mask, kv_len, softcap, lse if return_lse else None,
                 _args.stream(q, "torch"))
    return out, lse


def _attention_out_kernel(q, k, v, causal, scale, mask, kv_len, softcap, return_lse, out):
    inference_only("attention", q=q, k=k, v=v, mask=mask, out=out)
    lse = _lse(q, v, return_lse)
    _C.attention(q, k, v, out, causal, scale, mask, kv_len, softcap, lse if return_lse else None,
                 _args.stream(q, "torch"))
    return lse


for _key in ("CPU", "CUDA"):
    _lib.impl("attention", _attention_kernel, _key)
    _lib.impl("attention_out", _attention_out_kernel, _key)


@torch.library.register_fake("kiln::attention")
def _attention_fake(q, k, v, causal, scale, mask, kv_len, softcap, return_lse):
    _args.same_device("attention", q=q, k=k, v=v, mask=mask, kv_len=kv_len)
    return _outputs(q, v, return_lse)


@torch.library.register_fake("kiln::attention_out")
def _attention_out_fake(q, k, v, causal, scale, mask, kv_len, softcap, return_lse, out):
    _args.same_device("attention", q=q, k=k, v=v, mask=mask, kv_len=kv_len, out=out)
    return _lse(q, v, return_lse)


def attention(q, k, v, causal, scale, mask, kv_len, softcap, return_lse, out=None):
    """kiln.attention for torch tensors: a bool mask becomes additive (0 / -inf) first; with
    `out`, the out variant writes it."""
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask, float("-inf"))
    if out is None:
        out, lse = torch.ops.kiln.attention(q, k, v, causal, scale, mask, kv_len, softcap,
                                            return_lse)
    else:
        lse = torch.ops.kiln.attention_out(q, k, v, causal, scale, mask, kv_len, softcap,
                                           return_lse, out)
    return (out, lse) if return_lse else out
