"""kiln.attention for torch tensors, numpy arrays and CuPy arrays.

The output is allocated with q's framework on q's device; CUDA work goes on that framework's
current stream. torch is never imported here: a torch tensor can only come from a process that
has imported it already.
"""

import sys

import numpy as np

from . import _C
from ._C import InvalidArgumentError


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def out_shapes(q_shape, v_shape) -> tuple:
    """([N, Hq, Lq, Dv], [N, Hq, Lq]) for q [N, Hq, Lq, D] and v [N, Hkv, Lk, Dv]."""
    if len(q_shape) != 4 or len(v_shape) != 4:
        raise InvalidArgumentError(
            f"kiln::attention: q has shape {_shape_str(q_shape)} and v {_shape_str(v_shape)}, "
            "expected 4 dims each ([N, H, L, D], F.scaled_dot_product_attention's layout)"
        )
    n, hq, lq, _ = q_shape
    return (n, hq, lq, v_shape[3]), (n, hq, lq)


def attention(q, k, v, *, causal=False, scale=None, mask=None, kv_len=None, softcap=None,
              return_lse=False):
    """Scaled dot-product attention with F.scaled_dot_product_attention's layout.

    q: [N, Hq, Lq, D] f16/bf16, or f32 (rounded to k's dtype in the kernel).
    k: [N, Hkv, Lk, D], v: [N, Hkv, Lk, Dv], f16/bf16 of one dtype; Hq a multiple of Hkv (GQA,
       MQA). Strided views are taken as they are (packed-QKV slices, a KV cache longer than Lk).
    causal: key j visible to query i when j <= i + Lk - Lq (aligned to the bottom right).
    scale: multiplies q·k; default 1 / sqrt(D).
    mask: additive, broadcastable to [N, Hq, Lq, Lk] (2 to 4 dims), f32/f16/bf16; a torch bool
       mask (True = attend, as SDPA takes it) is turned into an additive one first.
    kv_len: i32/i64 [N] valid keys per batch (keys past it are hidden).
    softcap: s <- softcap * tanh(s / softcap) after the scale.
    return_lse: also return the f32 [N, Hq, Lq] log-sum-exp of the scaled logits.

    Returns out [N, Hq, Lq, Dv] contiguous, in q's dtype (and lse). A row with no visible key
    gives zeros (SDPA gives NaN there) and lse -inf.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(q, torch.Tensor):
        from . import _torch_attention

        return _torch_attention.attention(q, k, v, causal, scale, mask, kv_len, softcap,
                                          return_lse)

    out_shape, lse_shape = out_shapes(q.shape, v.shape)
    args = (bool(causal), None if scale is None else float(scale), mask, kv_len,
            None if softcap is None else float(softcap))
    if isinstance(q, np.ndarray):
        out = np.empty(out_shape, dtype=q.dtype)
        lse = np.empty(lse_shape, dtype=np.float32) if return_lse else None
        _C.attention(q, k, v, out, *args, lse, 0)
        return (out, lse) if return_lse else out

    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(q, cupy.ndarray):
        with q.device:
            out = cupy.empty(out_shape, dtype=q.dtype)
            lse = cupy.empty(lse_shape, dtype=cupy.float32) if return_lse else None
            _C.attention(q, k, v, out, *args, lse, cupy.cuda.get_current_stream().ptr)
        return (out, lse) if return_lse else out

    raise InvalidArgumentError(
        f"kiln::attention: q is a {type(q).__module__}.{type(q).__qualname__}, expected a torch "
        "tensor, a numpy array or a CuPy array"
    )
