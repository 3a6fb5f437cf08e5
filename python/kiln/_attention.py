"""kiln.attention for torch tensors, numpy arrays and CuPy arrays.

The output is allocated with q's framework on q's device; CUDA work goes on that framework's
current stream. torch is never imported here: a torch tensor can only come from a process that
has imported it already.
"""

import numpy as np

from . import _C, _args
from ._C import InvalidArgumentError


def out_shapes(q_shape, v_shape) -> tuple:
    """([N, Hq, Lq, Dv], [N, Hq, Lq]) for q [N, Hq, Lq, D] and v [N, Hkv, Lk, Dv]."""
    if len(q_shape) != 4 or len(v_shape) != 4:
        raise InvalidArgumentError(
            f"kiln::attention: q has shape {_args.shape_str(q_shape)} and v "
            f"{_args.shape_str(v_shape)}, expected 4 dims each ([N, H, L, D], "
            "F.scaled_dot_product_attention's layout)"
        )
    n, hq, lq, _ = q_shape
    return (n, hq, lq, v_shape[3]), (n, hq, lq)


def check_out(q_shape, v_shape, out) -> None:
    """out must have the [N, Hq, Lq, Dv] shape of the call (its strides are the op's to check)."""
    shape, _ = out_shapes(q_shape, v_shape)
    if tuple(out.shape) != shape:
        raise InvalidArgumentError(
            f"kiln::attention: out has shape {_args.shape_str(out.shape)}, expected "
            f"{_args.shape_str(shape)} ([N, Hq, Lq, Dv] from q and v)")


def attention(q, k, v, *, causal=False, scale=None, mask=None, kv_len=None, softcap=None,
              return_lse=False, out=None):
    """Scaled dot-product attention with F.scaled_dot_product_attention's layout.

    q: [N, Hq, Lq, D] f16/bf16, or f32 (rounded to k's dtype in the kernel).
    k: [N, Hkv, Lk, D], v: [N, Hkv, Lk, Dv], f16/bf16 of one dtype; Hq a multiple of Hkv (GQA,
       MQA). Strided views are taken as they are (packed-QKV slices, a KV cache longer than Lk).
    causal: key j visible to query i when j <= i + Lk - Lq: aligned to the bottom right, as
       FlashAttention and a KV cache do (SDPA's is_causal aligns to the top left: the two agree
       when Lq = Lk).
    scale: multiplies q·k; default 1 / sqrt(D). softcap: s <- softcap * tanh(s / softcap) after
       the scale. Both finite and > 0.
    mask: additive, broadcastable to [N, Hq, Lq, Lk] (2 to 4 dims), f32/f16/bf16; a torch bool
       mask (True = attend, as SDPA takes it) is turned into an additive one first.
    kv_len: i32/i64 [N] valid keys per batch (keys past it are hidden and never read); on CPU a
       value outside [0, Lk] is an error, on CUDA (device memory, not read on the host) the
       kernel clamps it to [0, Lk].
    return_lse: also return the f32 [N, Hq, Lq] log-sum-exp of the scaled logits.
    out: None, or the [N, Hq, Lq, Dv] f32/f16/bf16 array to write (q's framework and device) and
       return: Dv contiguous, rows any strides that do not overlap, e.g. ``buf.view(N, Lq, Hq,
       Dv).transpose(1, 2)`` of a [N, Lq, Hq * Dv] buffer, so that the rows land as the output
       projection reads them with no transpose copy. On CUDA its other strides are multiples of
       16 bytes and its start 16-byte aligned, as for q, k and v.

    Returns out [N, Hq, Lq, Dv], contiguous in q's dtype unless given (and lse). NaN and inf flow as in SDPA:
    a NaN or +inf score makes its row NaN. A row whose scores are all -inf (every key hidden by
    the mask, causal or kv_len) gives zeros and lse -inf, as torch 2.15's SDPA on CPU does (older
    torch and some SDPA backends give NaN). N, Hq, Lq or Dv = 0 give empty results.
    """
    kind = _args.check_arrays("attention", q=q, k=k, v=v, mask=mask, kv_len=kv_len, out=out)
    if out is not None:
        _args.writable("attention", "out", out)
        check_out(q.shape, v.shape, out)
    scale = None if scale is None else _args.real("attention", "scale", scale, positive=True)
    softcap = None if softcap is None else _args.real("attention", "softcap", softcap,
                                                      positive=True)
    if kind == "torch":
        from . import _torch_attention

        return _torch_attention.attention(q, k, v, bool(causal), scale, mask, kv_len, softcap,
                                          bool(return_lse), out)

    out_shape, lse_shape = out_shapes(q.shape, v.shape)
    if out is None:
        out = _args.empty(kind, q, out_shape, q.dtype)
    lse = _args.empty(kind, q, lse_shape, np.float32) if return_lse else None
    _C.attention(q, k, v, out, bool(causal), scale, mask, kv_len, softcap, lse,
                 _args.stream(q, kind))
    return (out, lse) if return_lse else out
