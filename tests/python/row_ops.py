"""Shared checks of the row ops' tests (test_norm.py, test_activation.py): relative error against
an f64 reference, and the fp8 outputs against kiln.quantize_fp8 of the op's own f32 result."""

import math

import torch

import kiln

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Unit roundoff: half an ulp at 1, relative.
ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
FP8 = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# Relative error of a value after an fp8 round trip: half an ulp of its mantissa.
FP8_ROUNDOFF = {"e4m3fn": 2.0**-4, "e5m2": 2.0**-3}


def check_close(got, want, out_dtype, f32_math, extra=0.0):
    """||got - want|| / ||want|| within twice out_dtype's roundoff plus the op's f32 math (and
    `extra`); no NaN; the reference must not be all zeros."""
    assert got.dtype == out_dtype
    assert got.shape == want.shape
    got64 = got.detach().double().cpu()
    assert not got64.isnan().any(), "output holds NaN"
    norm = want.norm().item()
    assert norm > 0, "reference is all zeros: the test would pass vacuously"
    err = ((got64 - want).norm() / norm).item()
    bound = 2 * ROUNDOFF[out_dtype] + f32_math + extra
    assert err <= bound, f"relative error {err:.3e} > {bound:.3e}"


def check_quantized(op, fmt, *args, **kwargs):
    """op(..., quantize=fmt) is bit for bit kiln.quantize_fp8 of op(..., out_dtype=f32) on the
    same device. Returns (q, scale, y32)."""
    q, scale = op(*args, quantize=fmt, **kwargs)
    y32 = op(*args, out_dtype=torch.float32, **kwargs)
    want_q, want_scale = kiln.quantize_fp8(y32, fmt, "row")
    assert q.dtype == FP8[fmt] and q.shape == y32.shape and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (math.prod(y32.shape[:-1]),)
    assert torch.equal(scale, want_scale), "per-row scales differ from quantize_fp8's"
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), "codes differ"
    assert (scale > 0).all()
    return q, scale, y32
