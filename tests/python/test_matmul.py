"""kiln.quantize_fp8 / dequantize / quantize_q8_0 / matmul / prepare_weight from Python.

Oracles are written here from the formats' definitions, in numpy: a bit-level fp8 decoder (each
format by its own rule), ggml's quantize_row_q8_0_ref in f32, and matmul as the f64 product of
the dequantized weights. Inputs are fresh random draws (conftest seeds and prints the seed).
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import kiln
from conftest import DEVICES, HAS_CUDA

FP8 = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {"e4m3fn": 448.0, "e5m2": 57344.0}
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
M_VALUES = [1, 2, 3, 5, 8, 16, 17, 33, 100, 257]


# ---- oracles ---------------------------------------------------------------------------------


def decode_fp8(codes: np.ndarray, fmt: str) -> np.ndarray:
    """f64 values of fp8 bytes, from the bit layout (OCP FP8): e4m3fn = s eeee mmm, bias 7, no
    infinities, NaN = exponent and mantissa all ones; e5m2 = s eeeee mm, bias 15, IEEE-style
    infinities (exponent 31, mantissa 0) and NaNs."""
    codes = codes.astype(np.int64)
    exp_bits, man_bits, bias = (4, 3, 7) if fmt == "e4m3fn" else (5, 2, 15)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exponent = (codes >> man_bits) & ((1 << exp_bits) - 1)
    mantissa = codes & ((1 << man_bits) - 1)
    normal = (1.0 + mantissa / 2.0**man_bits) * np.exp2(exponent - bias)
    subnormal = (mantissa / 2.0**man_bits) * 2.0 ** (1 - bias)
    value = sign * np.where(exponent == 0, subnormal, normal)
    top = (1 << exp_bits) - 1
    if fmt == "e4m3fn":
        value = np.where((exponent == top) & (mantissa == (1 << man_bits) - 1), np.nan, value)
    else:
        value = np.where((exponent == top) & (mantissa == 0), sign * np.inf, value)
        value = np.where((exponent == top) & (mantissa != 0), np.nan, value)
    return value


def encode_fp8(values: np.ndarray, fmt: str) -> np.ndarray:
    """fp8 bytes of f64 values by exhaustive search: the nearest finite code, ties to the even
    code (mantissa LSB 0), saturating to +-max; NaN to a NaN code. The reference encoder."""
    codes = np.arange(256)
    table = decode_fp8(codes, fmt)
    finite = np.isfinite(table)
    cand_codes, cand_values = codes[finite], table[finite]
    out = np.empty(values.shape, dtype=np.uint8)
    for index, v in np.ndenumerate(values):
        if np.isnan(v):
            out[index] = 0x7F
            continue
        v = float(np.clip(v, -FP8_MAX[fmt], FP8_MAX[fmt]))
        dist = np.abs(cand_values - v)
        best = np.flatnonzero(dist == dist.min())
        if len(best) > 1:  # a tie (or +-0): the even code, with the sign of v
            even = [c for c in cand_codes[best] if c % 2 == 0]
            signed = [c for c in even if (c >> 7) == (1 if math.copysign(1, v) < 0 else 0)]
            out[index] = (signed or even)[0]
        else:
            out[index] = cand_codes[best[0]]
    return out


def quantize_q8_0_reference(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_0_ref in f32: d = amax / 127, id = 1/d (0 if d == 0),
    qs = roundf(x * id) (half away from zero), d stored as f16; 34 bytes per block."""
    x = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(x).max(axis=-1)
    d = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0))
    scaled = (x * inv[..., None].astype(np.float32)).astype(np.float32)
    qs = (np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))).astype(np.int8)
    blocks = np.empty((*x.shape[:2], 34), dtype=np.uint8)
    blocks[..., :2] = d.astype(np.float16)[..., None].view(np.uint8)
    blocks[..., 2:] = qs.view(np.uint8)
    return blocks.reshape(x.shape[0], -1)


def dequantize_q8_0_reference(q: np.ndarray) -> np.ndarray:
    blocks = q.reshape(q.shape[0], -1, 34)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float64)
    qs = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.float64)
    return (qs * d[..., None]).reshape(q.shape[0], -1)


def expand_scale(scale: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A [1], [R] or [ceil(R/128), ceil(C/128)] scale as the f64 [R, C] it multiplies."""
    scale = np.asarray(scale, dtype=np.float64)
    if scale.size == 1:
        return np.full((rows, cols), scale.reshape(-1)[0])
    if scale.ndim == 1:
        return np.repeat(scale[:, None], cols, axis=1)
    return np.repeat(np.repeat(scale, 128, axis=0), 128, axis=1)[:rows, :cols]


def codes(t: torch.Tensor) -> np.ndarray:
    return t.cpu().contiguous().view(torch.uint8).numpy()


def to_numpy64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    norm = np.linalg.norm(want)
    assert norm > 0, "reference is all zeros"
    return float(np.linalg.norm(got - want) / norm)


def rounded(want: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The f64 reference rounded to the output dtype (what a perfect kernel returns)."""
    return torch.from_numpy(want).to(dtype).double().numpy()


# ---- fp8 formats: all 256 codes ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
def test_reference_decoder_matches_torch_float8(fmt):
    all_codes = torch.arange(256, dtype=torch.uint8)
    torch_values = all_codes.view(FP8[fmt]).double().numpy()
    ours = decode_fp8(all_codes.numpy(), fmt)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(torch_values))
    finite = ~np.isnan(ours)
    np.testing.assert_array_equal(ours[finite], torch_values[finite])
    assert np.nanmax(np.abs(ours[np.isfinite(ours)])) == FP8_MAX[fmt]


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_all_codes(fmt, device):
    q = torch.arange(256, dtype=torch.uint8, device=device).view(FP8[fmt]).reshape(2, 128)
    out = kiln.dequantize(q, torch.ones(1, device=device), out_dtype=torch.float32)
    want = decode_fp8(np.arange(256), fmt).reshape(2, 128)
    got = to_numpy64(out)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got[finite], want[finite])
    # Against torch's float8 dtypes too.
    np.testing.assert_array_equal(got[finite], to_numpy64(q.float())[finite])


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("device", DEVICES)
def test_quantize_all_codes_round_trip_and_ties(fmt, device):
    """Every finite value encodes to its own code; midpoints between neighbours round to the
    even code; beyond max saturates; NaN stays NaN."""
    table = decode_fp8(np.arange(256), fmt)
    finite = np.flatnonzero(np.isfinite(table))
    values = table[finite]
    order = np.argsort(values, kind="stable")
    sorted_values = np.unique(values[order])
    midpoints = (sorted_values[:-1] + sorted_values[1:]) / 2
    extremes = np.array([FP8_MAX[fmt] * 1.5, -FP8_MAX[fmt] * 3, 2.0**100, -(2.0**100), np.nan])
    x = np.concatenate([values, midpoints, extremes])
    x_t = torch.from_numpy(x).to(torch.float32).to(device)
    # Every input is exactly representable in f32 (midpoints of fp8 values need 5 bits).
    assert np.array_equal(x_t.cpu().double().numpy()[:-1], x[:-1])
    q, scale = kiln.quantize_fp8(x_t.reshape(1, -1), fmt, "tensor", scale=1.0)
    assert q.dtype == FP8[fmt] and q.shape == (1, x.size)
    assert to_numpy64(scale).tolist() == [1.0]
    got = codes(q).reshape(-1)
    want = encode_fp8(x, fmt)
    n_values = values.size
    # Exact codes for the values themselves (+0 and -0 keep their signs).
    np.testing.assert_array_equal(got[:n_values], finite.astype(np.uint8))
    np.testing.assert_array_equal(got[n_values:-1], want[n_values:-1])
    assert np.isnan(decode_fp8(got[-1:], fmt)[0])


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("device", DEVICES)
def test_quantize_matches_torch_cast_in_range(fmt, device):
    """x / scale within range: kiln's codes are torch's `.to(float8)` codes (both RNE)."""
    x = torch.randn(37, 201, device=device) * 3
    scale = torch.tensor([0.0173], device=device)
    q, _ = kiln.quantize_fp8(x, fmt, "tensor", scale=scale)
    want = (x / scale).clamp(-FP8_MAX[fmt], FP8_MAX[fmt]).to(FP8[fmt])
    np.testing.assert_array_equal(codes(q), codes(want))


# ---- quantize_fp8: computed scales -----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_quantize_fp8_computed_scale(fmt, granularity, x_dtype, device):
    rows, cols = 259, 300  # odd, not multiples of the 128 block
    base = torch.randn(rows + 3, cols * 2, device=device) * torch.rand(rows + 3, 1, device=device)
    x = base.to(x_dtype)[2:-1, ::2]  # strided view
    x[5] = 0  # an all-zero row: scale 1 for "row"
    q, scale = kiln.quantize_fp8(x, fmt, granularity)
    x64 = to_numpy64(x)
    amax_groups = {
        "tensor": lambda a: np.array([np.abs(a).max()]),
        "row": lambda a: np.abs(a).max(axis=1),
        "block": lambda a: np.array([[np.abs(a[i:i + 128, j:j + 128]).max()
                                      for j in range(0, cols, 128)]
                                     for i in range(0, rows, 128)]),
    }[granularity](x64)
    want_scale = (amax_groups.astype(np.float32) / np.float32(FP8_MAX[fmt])).astype(np.float32)
    want_scale[want_scale == 0] = 1
    assert scale.dtype == torch.float32
    np.testing.assert_array_equal(scale.cpu().numpy(), want_scale)
    s = expand_scale(want_scale, rows, cols)
    want = encode_fp8((x64.astype(np.float32) / s.astype(np.float32)).astype(np.float64)[:3],
                      fmt)
    np.testing.assert_array_equal(codes(q)[:3], want)  # first rows bit-exact (search encoder)
    deq = decode_fp8(codes(q), fmt) * s
    # Quantization error bound: half an fp8 ulp relative (3 or 2 mantissa bits) + subnormals.
    bits = 3 if fmt == "e4m3fn" else 2
    bound = 2.0 ** -(bits + 1) * np.abs(x64) + 2.0 ** (-6 - 3 if fmt == "e4m3fn" else -14 - 2) * s
    assert np.all(np.abs(deq - x64) <= bound * 1.0001)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_fp8_leading_dims(device):
    x = torch.randn(2, 3, 64, device=device, dtype=torch.bfloat16)
    q, scale = kiln.quantize_fp8(x, "e4m3fn", "row")
    assert q.shape == x.shape and scale.shape == (6,)
    q2, scale2 = kiln.quantize_fp8(x.reshape(6, 64), "e4m3fn", "row")
    np.testing.assert_array_equal(codes(q).reshape(6, 64), codes(q2))
    np.testing.assert_array_equal(scale.cpu().numpy(), scale2.cpu().numpy())


# ---- dequantize -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_fp8(fmt, granularity, out_dtype, device):
    rows, cols = 131, 257
    raw = torch.randint(0, 256, (rows, cols), dtype=torch.uint8)
    raw[torch.from_numpy(~np.isfinite(decode_fp8(raw.numpy(), fmt)))] = 0x10
    q = raw.view(FP8[fmt]).to(device)
    shape = {"tensor": (1,), "row": (rows,), "block": (2, 3)}[granularity]
    scale = (torch.rand(shape) + 0.5).to(device)
    out = kiln.dequantize(q, scale, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (rows, cols) and out.is_contiguous()
    s32 = expand_scale(scale.cpu().numpy(), rows, cols).astype(np.float32)
    product = (decode_fp8(raw.numpy(), fmt).astype(np.float32) * s32).astype(np.float32)
    want = torch.from_numpy(product).to(out_dtype)  # one rounding of the f32 product
    np.testing.assert_array_equal(to_numpy64(out), to_numpy64(want))


# ---- Q8_0 -----------------------------------------------------------------------------------


def test_q8_0_known_answer():
    """One block with x[j] = j - 16: amax 16, d = 16/127 (f16 0x3008), id = 1/d = 7.9375, so
    qs[j] = roundf((j - 16) * 7.9375): -127 for j = 0, 0 for j = 16, 8 for j = 17, 119 for
    j = 31. An all-zero block is all zero bytes (d = 0, qs = 0)."""
    x = (np.arange(32, dtype=np.float32) - 16).reshape(1, 32)
    q = kiln.quantize_q8_0(x)
    assert q.dtype == np.uint8 and q.shape == (1, 34)
    assert q[0, :2].view(np.float16)[0] == np.float16(16 / 127)
    assert q[0, :2].tobytes() == np.float16(16 / 127).tobytes()
    assert q[0, :2].tobytes() == bytes([0x08, 0x30])
    qs = q[0, 2:].view(np.int8)
    assert qs[0] == -127 and qs[16] == 0 and qs[17] == 8 and qs[31] == 119  # 15 * 7.9375 = 119.06
    zero = kiln.quantize_q8_0(np.zeros((1, 32), dtype=np.float32))
    assert zero.tobytes() == bytes(34)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_quantize_q8_0_matches_ggml_reference(x_dtype, device):
    rows, cols = 67, 32 * 9
    base = torch.randn(rows, cols + 5, device=device) * torch.rand(rows, 1, device=device) * 10
    x = base.to(x_dtype)[:, 3:3 + cols]  # strided
    x[3, 32:64] = 0  # a zero block
    # amax 127: d = 1 exactly, so x = k + 0.5 are ties, rounded half away from zero.
    x[4, :32] = torch.cat([torch.arange(-15.5, 15.5), torch.tensor([127.0])])
    q = kiln.quantize_q8_0(x)
    assert q.shape == (rows, cols // 32 * 34) and q.dtype == torch.uint8
    np.testing.assert_array_equal(q.cpu().numpy(), quantize_q8_0_reference(to_numpy64(x)))
    out = kiln.dequantize(q, out_dtype=torch.float32)
    np.testing.assert_array_equal(to_numpy64(out), dequantize_q8_0_reference(q.cpu().numpy()))


def test_numpy_q8_0_and_fp8_bytes():
    x = np.random.standard_normal((5, 64)).astype(np.float32)
    q = kiln.quantize_q8_0(x)
    np.testing.assert_array_equal(q, quantize_q8_0_reference(x))
    np.testing.assert_array_equal(kiln.dequantize(q), dequantize_q8_0_reference(q))
    q8, scale = kiln.quantize_fp8(x, "e4m3fn", "row")
    assert q8.dtype == np.uint8 and scale.shape == (5,)
    want, _ = kiln.quantize_fp8(torch.from_numpy(x), "e4m3fn", "row")
    np.testing.assert_array_equal(q8, codes(want))
    deq = kiln.dequantize(q8, scale, fmt="e4m3fn", out_dtype="f16")
    assert deq.dtype == np.float16
    want = (decode_fp8(q8, "e4m3fn").astype(np.float32) * scale[:, None]).astype(np.float16)
    np.testing.assert_array_equal(deq, want)


# ---- matmul ---------------------------------------------------------------------------------


def make_weight(fmt: str, scale_kind: str, n: int, k: int, device):
    """(w as kiln takes it, w_scale or None, f64 [N, K] dequantized weight)."""
    w_float = torch.randn(n, k) * (torch.rand(n, 1) + 0.1)
    if fmt == "q8_0":
        q = kiln.quantize_q8_0(w_float)
        return q.to(device), None, dequantize_q8_0_reference(q.numpy())
    if fmt in ("f16", "bf16"):
        w = w_float.to(torch.float16 if fmt == "f16" else torch.bfloat16)
        return w.to(device), None, to_numpy64(w)
    granularity = {"tensor": "tensor", "row": "row", "block": "block"}[scale_kind]
    q, scale = kiln.quantize_fp8(w_float, fmt, granularity)
    deq = decode_fp8(codes(q), fmt) * expand_scale(scale.numpy(), n, k)
    return q.to(device), scale.to(device), deq


def check_matmul(out, a, w64, a_scale, bias, out_dtype, device, tol=None, gate=None,
                 residual=None):
    """out against residual + gate * (a . w64^T * a_scale + bias) in f64; a gate [B, N] covers
    M / B rows each."""
    a64 = to_numpy64(a.float() if a.dtype in FP8.values() else a)
    if a_scale is not None:
        a64 = a64 * expand_scale(to_numpy64(a_scale).reshape(-1), a64.shape[0], 1)
    want = a64.reshape(-1, w64.shape[1]) @ w64.T
    if bias is not None:
        want = want + to_numpy64(bias)
    if gate is not None:
        g = to_numpy64(gate).reshape(-1, w64.shape[0])
        want = want * np.repeat(g, want.shape[0] // g.shape[0], axis=0)
    if residual is not None:
        want = want + to_numpy64(residual).reshape(want.shape)
    want = want.reshape(*a.shape[:-1], w64.shape[0])
    assert out.dtype == out_dtype and tuple(out.shape) == want.shape
    got = to_numpy64(out)
    if tol is None:
        tol = 1e-6 if out_dtype == torch.float32 and device == "cpu" else 1e-3
        if device != "cpu" and a.dtype == torch.float32:
            tol = 4e-3  # tensor cores read f32 activations at 16 bits
    err = rel_error(got, rounded(want, out_dtype))
    assert err <= tol, f"relative Frobenius error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("fmt,scale_kind", [("e4m3fn", "tensor"), ("e4m3fn", "row"),
                                            ("e4m3fn", "block"), ("e5m2", "row"),
                                            ("e5m2", "block"), ("q8_0", None), ("f16", None),
                                            ("bf16", None)])
@pytest.mark.parametrize("path", ["auto", "gemv", "gemm", "reference"])
@pytest.mark.parametrize("device", DEVICES)
def test_matmul_every_m(fmt, scale_kind, path, device):
    n, k = 131, 320 if fmt == "q8_0" else 200  # N odd; K not a multiple of 128 (or 64)
    w, w_scale, w64 = make_weight(fmt, scale_kind, n, k, device)
    if path == "reference" and device != "cpu":
        # The reference is the CPU backend; CUDA tensors take the CUDA paths.
        with pytest.raises(kiln.InvalidArgumentError, match="path reference runs on"):
            kiln.matmul(torch.randn(2, k, device=device), w, w_scale=w_scale, path=path)
        return
    for m in M_VALUES:
        # CPU tensors run the reference whatever the path asked (the paths are CUDA kernels).
        if path == "gemv" and m > 16 and device != "cpu":
            continue
        a_dtype = [torch.bfloat16, torch.float16, torch.float32][m % 3]
        a = torch.randn(m, k, device=device).to(a_dtype)
        out = kiln.matmul(a, w, w_scale=w_scale, path=path)
        check_matmul(out, a, w64, None, None, a_dtype, device)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_matmul_bias_out_dtype_strided(out_dtype, with_bias, device):
    m, n, k = 33, 257, 384
    w, w_scale, w64 = make_weight("e4m3fn", "row", n, k, device)
    storage = torch.randn(m, k + 64, device=device, dtype=torch.bfloat16)
    a = storage[:, 16:16 + k]  # row stride k + 64
    bias = torch.randn(n, device=device, dtype=torch.bfloat16) if with_bias else None
    out = kiln.matmul(a, w, w_scale=w_scale, bias=bias, out_dtype=out_dtype)
    check_matmul(out, a, w64, None, bias, out_dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_leading_dims(device):
    n, k = 64, 96
    w, w_scale, w64 = make_weight("e4m3fn", "tensor", n, k, device)
    a = torch.randn(2, 3, 5, k, device=device, dtype=torch.bfloat16)
    out = kiln.matmul(a, w, w_scale=w_scale)
    assert out.shape == (2, 3, 5, n)
    check_matmul(out, a, w64, None, None, torch.bfloat16, device)


@pytest.mark.parametrize("a_fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("a_scale_kind", ["tensor", "row"])
@pytest.mark.parametrize("device", DEVICES)
def test_matmul_fp8_activations(a_fmt, a_scale_kind, device):
    for m in (1, 16, 100):
        n, k = 96, 256
        w, w_scale, w64 = make_weight("e4m3fn", "row", n, k, device)
        a_q, a_scale = kiln.quantize_fp8(torch.randn(m, k, device=device), a_fmt, a_scale_kind)
        out = kiln.matmul(a_q, w, w_scale=w_scale, a_scale=a_scale, out_dtype=torch.bfloat16)
        # On sm_89+ auto runs fp8 x fp8 on the fp8 tensor cores (cuBLASLt, as torch._scaled_mm),
        # which accumulate in reduced precision between promotions to f32: up to 1.4e-3 at 16-bit
        # out (tests/ops/matmul/test_gemm.cpp, tolerance()).
        fp8_cores = device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
        check_matmul(out, a_q, w64, a_scale, None, torch.bfloat16, device,
                     tol=3e-3 if fp8_cores else None)


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_auto_equals_chosen_path(device):
    n, k = 200, 256
    w, w_scale, _ = make_weight("e4m3fn", "row", n, k, device)
    for m in (1, 8, 16, 17, 100):
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        chosen = kiln.select_path(m, w, a_dtype=torch.bfloat16)
        if device == "cpu":
            assert chosen == "reference"
            continue
        assert chosen in ("gemv", "gemm", "fp8_native")
        auto = kiln.matmul(a, w, w_scale=w_scale)
        explicit = kiln.matmul(a, w, w_scale=w_scale, path=chosen)
        assert torch.equal(auto, explicit), f"auto differs from {chosen} at M = {m}"


@pytest.mark.parametrize("fmt", ["e4m3fn", "q8_0", "bf16"])
@pytest.mark.parametrize("path", ["auto", "gemv", "gemm"])
@pytest.mark.parametrize("device", DEVICES)
def test_prepare_weight(fmt, path, device):
    n, k = 131, 256
    w, w_scale, w64 = make_weight(fmt, "row", n, k, device)
    if device == "cpu" and path == "gemm":
        with pytest.raises(kiln.UnsupportedError, match="kiln::prepare_weight: layout gemm_packed"):
            kiln.prepare_weight(w, w_scale, path=path)
        return
    prepared = kiln.prepare_weight(w, w_scale, path=path)
    assert isinstance(prepared, kiln.PreparedWeight)
    assert prepared.nbytes > 0 and prepared.shape == (n, k)
    assert prepared.storage.dtype == torch.uint8 and prepared.storage.device == w.device
    for m in (1, 17):
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        out = kiln.matmul(a, prepared)
        # A dequantized copy rounds q * scale to bf16 once: allow that on top of accumulation.
        check_matmul(out, a, w64, None, None, torch.bfloat16, device, tol=4e-3)


def test_numpy_matmul_matches_torch():
    n, k, m = 65, 96, 7
    w, w_scale, w64 = make_weight("e4m3fn", "row", n, k, "cpu")
    a = np.random.standard_normal((m, k)).astype(np.float32)
    out = kiln.matmul(a, codes(w), w_scale=w_scale.numpy(), w_fmt="e4m3fn")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (m, n)
    want = kiln.matmul(torch.from_numpy(a), w, w_scale=w_scale)
    np.testing.assert_array_equal(out, want.numpy())
    # fp8 activations as bytes, and a prepared weight, in numpy too.
    a_q, a_scale = kiln.quantize_fp8(a, "e5m2", "row")
    out = kiln.matmul(a_q, codes(w), w_scale=w_scale.numpy(), a_scale=a_scale, w_fmt="e4m3fn",
                      a_fmt="e5m2")
    want = kiln.matmul(torch.from_numpy(a_q).view(torch.float8_e5m2), w, w_scale=w_scale,
                       a_scale=torch.from_numpy(a_scale), out_dtype=torch.float32)
    np.testing.assert_array_equal(out, want.numpy())
    prepared = kiln.prepare_weight(codes(w), w_scale.numpy(), fmt="e4m3fn")
    assert isinstance(prepared.storage, np.ndarray) and prepared.nbytes == n * k
    np.testing.assert_array_equal(kiln.matmul(a, prepared),
                                  kiln.matmul(torch.from_numpy(a), w, w_scale=w_scale).numpy())
    q = kiln.quantize_q8_0(np.random.standard_normal((n, k)).astype(np.float32))
    out = kiln.matmul(a.astype(np.float16), q, out_dtype="f32")
    want = a.astype(np.float16).astype(np.float64) @ dequantize_q8_0_reference(q).T
    assert rel_error(out.astype(np.float64), want) < 1e-6


# ---- epilogue: gate and residual ----------------------------------------------------------------


def modulation_gate(b, n, device, dtype=torch.bfloat16):
    """A [B, N] gate as Flux makes it: a chunk of a [B, 3 N] modulation output (strided rows)."""
    return (torch.randn(b, 3 * n, device=device) * 0.5).to(dtype)[:, n:2 * n]


# CPU tensors run the reference whatever the path (test_matmul_every_m covers the refusal of
# CUDA paths there); CUDA tensors run each path.
DEVICE_PATHS = [("cpu", "auto")] + [
    pytest.param("cuda", path, marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))
    for path in ("auto", "gemv", "gemm")
]


@pytest.mark.parametrize("fmt,scale_kind", [("e4m3fn", "row"), ("e4m3fn", "block"),
                                            ("q8_0", None), ("bf16", None)])
@pytest.mark.parametrize("device,path", DEVICE_PATHS)
def test_matmul_gate_residual_every_m(fmt, scale_kind, device, path):
    """out = residual + gate * (a . w^T + bias) on every path, M odd and round, B = 1 and > 1."""
    n, k = 131, 320 if fmt == "q8_0" else 200
    w, w_scale, w64 = make_weight(fmt, scale_kind, n, k, device)
    bias = torch.randn(n, device=device)
    for m in M_VALUES:
        if path == "gemv" and m > 16:
            continue
        batch = 1 if m % 2 else m  # [M, N] gates for even M: one row per token
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        gate = modulation_gate(batch, n, device)
        residual = torch.randn(m, n, device=device, dtype=[torch.float32, torch.bfloat16,
                                                          torch.float16][m % 3])
        out = kiln.matmul(a, w, w_scale=w_scale, bias=bias, gate=gate, residual=residual,
                          path=path)
        check_matmul(out, a, w64, None, bias, torch.bfloat16, device, gate=gate,
                     residual=residual)


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_gate_per_batch_element(device):
    """a [B, L, K] with gate [B, N]: rows b * L .. b * L + L - 1 take gate[b]."""
    b_, l_, n, k = 3, 7, 96, 128
    w, w_scale, w64 = make_weight("e4m3fn", "row", n, k, device)
    a = torch.randn(b_, l_, k, device=device, dtype=torch.bfloat16)
    gate = modulation_gate(b_, n, device)
    residual = torch.randn(b_, l_, n, device=device, dtype=torch.bfloat16)
    out = kiln.matmul(a, w, w_scale=w_scale, gate=gate, residual=residual)
    assert out.shape == (b_, l_, n)
    check_matmul(out, a, w64, None, None, torch.bfloat16, device, gate=gate, residual=residual)
    # A [N] gate, a gate alone, a residual alone.
    g1 = torch.randn(n, device=device)
    check_matmul(kiln.matmul(a, w, w_scale=w_scale, gate=g1), a, w64, None, None,
                 torch.bfloat16, device, gate=g1)
    check_matmul(kiln.matmul(a, w, w_scale=w_scale, residual=residual, out_dtype=torch.float32),
                 a, w64, None, None, torch.float32, device, residual=residual)


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_residual_strided_rows(device):
    m, n, k = 33, 64, 96
    w, w_scale, w64 = make_weight("e4m3fn", "tensor", n, k, device)
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    stream = torch.randn(m, 3 * n, device=device, dtype=torch.bfloat16)
    residual = stream[:, n:2 * n]  # row stride 3 N
    out = kiln.matmul(a, w, w_scale=w_scale, residual=residual)
    check_matmul(out, a, w64, None, None, torch.bfloat16, device, residual=residual)
    assert torch.equal(out, kiln.matmul(a, w, w_scale=w_scale, residual=residual.contiguous()))


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_k0_gate_residual(device):
    """K = 0: out = residual + gate * bias."""
    w = torch.zeros(8, 0, device=device, dtype=torch.bfloat16)
    a = torch.zeros(4, 0, device=device, dtype=torch.bfloat16)
    bias, gate = torch.randn(8, device=device), torch.randn(2, 8, device=device)
    residual = torch.randn(4, 8, device=device)
    out = kiln.matmul(a, w, bias=bias, gate=gate, residual=residual, out_dtype=torch.float32)
    want = residual + gate.repeat_interleave(2, 0) * bias
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert kiln.matmul(torch.zeros(0, 0, device=device, dtype=torch.bfloat16), w,
                       gate=gate, residual=torch.zeros(0, 8, device=device)).shape == (0, 8)


@pytest.mark.parametrize("a_scale_kind", ["tensor", "row"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_matmul_fp8_activations_gate_residual(a_scale_kind, batch, device):
    """fp8 x fp8 (cuBLASLt on sm_89+): the fused gate / residual (C, beta = 1; the gate folded
    into the weight's scale vector) and the second pass over the product, against the
    reference."""
    n, k = 96, 256
    w, w_scale, w64 = make_weight("e4m3fn", "row", n, k, device)
    for m in (16, 128, 256):
        a_q, a_scale = kiln.quantize_fp8(torch.randn(m, k, device=device), "e4m3fn",
                                         a_scale_kind)
        gate = modulation_gate(batch, n, device)
        for residual_dtype in (torch.bfloat16, torch.float32):
            residual = torch.randn(m, n, device=device, dtype=residual_dtype)
            out = kiln.matmul(a_q, w, w_scale=w_scale, a_scale=a_scale, gate=gate,
                              residual=residual, out_dtype=torch.bfloat16)
            fp8_cores = device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
            check_matmul(out, a_q, w64, a_scale, None, torch.bfloat16, device,
                         tol=3e-3 if fp8_cores else None, gate=gate, residual=residual)


@pytest.mark.parametrize("path", ["auto", "gemv", "gemm"])
@pytest.mark.parametrize("device", DEVICES)
def test_matmul_in_place_residual(path, device):
    """The C++ API takes out == residual (an in-place add; kiln.matmul itself returns a fresh
    array): through the binding, on every path; a partial overlap is an error."""
    if device == "cpu":
        path = "auto"
    n, k = 72, 128
    for m in (3, 40):
        if path == "gemv" and m > 16:
            continue
        w, w_scale, w64 = make_weight("e4m3fn", "row", n, k, device)
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        gate = modulation_gate(1, n, device)
        stream = torch.randn(m, n, device=device, dtype=torch.bfloat16)
        before = stream.clone()
        kiln._C.matmul(a, w, "f8_e4m3fn", n, k, w_scale, "row_major", stream, None, None, path,
                       torch.cuda.current_stream().cuda_stream if device == "cuda" else 0,
                       gate=gate, residual=stream)
        check_matmul(stream, a, w64, None, None, torch.bfloat16, device, gate=gate,
                     residual=before)
        with pytest.raises(kiln.InvalidArgumentError, match=r"out overlaps residual"):
            kiln._C.matmul(a[:m - 1], w, "f8_e4m3fn", n, k, w_scale, "row_major", stream[1:],
                           None, None, path, 0, gate=None, residual=stream[:m - 1])


def test_numpy_matmul_gate_residual():
    n, k, m = 40, 64, 6
    w, w_scale, _ = make_weight("e4m3fn", "row", n, k, "cpu")
    a = np.random.standard_normal((m, k)).astype(np.float32)
    gate = np.random.standard_normal((2, n)).astype(np.float32)
    residual = np.random.standard_normal((m, n)).astype(np.float16)
    out = kiln.matmul(a, codes(w), w_scale=w_scale.numpy(), w_fmt="e4m3fn", gate=gate,
                      residual=residual)
    want = kiln.matmul(torch.from_numpy(a), w, w_scale=w_scale, gate=torch.from_numpy(gate),
                       residual=torch.from_numpy(residual))
    np.testing.assert_array_equal(out, want.numpy())


def test_matmul_gate_residual_errors():
    w, w_scale, _ = make_weight("e4m3fn", "row", 16, 64, "cpu")
    a = torch.randn(6, 64)
    invalid = kiln.InvalidArgumentError
    with pytest.raises(invalid, match=r"kiln::matmul: gate has shape \[4, 16\], expected \[16\] "
                                      r"or \[B, 16\] with B dividing M = 6"):
        kiln.matmul(a, w, w_scale=w_scale, gate=torch.randn(4, 16))
    with pytest.raises(invalid, match=r"kiln::matmul: gate has shape \[17\]"):
        kiln.matmul(a, w, w_scale=w_scale, gate=torch.randn(17))
    with pytest.raises(invalid, match=r"kiln::matmul: residual has shape \[6, 15\], expected "
                                      r"out's shape \[6, 16\]"):
        kiln.matmul(a, w, w_scale=w_scale, residual=torch.randn(6, 15))
    with pytest.raises(invalid, match=r"kiln::matmul: residual has stride 2 along N"):
        kiln.matmul(a, w, w_scale=w_scale, residual=torch.randn(6, 32)[:, ::2])
    with pytest.raises(invalid, match=r"kiln::matmul: gate has dtype i32"):
        kiln.matmul(a, w, w_scale=w_scale, gate=torch.ones(16, dtype=torch.int32))
    with pytest.raises(invalid, match=r"kiln::matmul: residual is a numpy.ndarray"):
        kiln.matmul(a, w, w_scale=w_scale, residual=np.zeros((6, 16), dtype=np.float32))


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_gate_residual_auto_equals_chosen_path():
    n, k = 200, 256
    w, w_scale, _ = make_weight("e4m3fn", "row", n, k, "cuda")
    for m in (1, 8, 16, 17, 100, 300):
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        gate = modulation_gate(1, n, "cuda")
        residual = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        chosen = kiln.select_path(m, w, a_dtype=torch.bfloat16)
        auto = kiln.matmul(a, w, w_scale=w_scale, gate=gate, residual=residual)
        explicit = kiln.matmul(a, w, w_scale=w_scale, gate=gate, residual=residual, path=chosen)
        assert torch.equal(auto, explicit), f"auto differs from {chosen} at M = {m}"


# ---- torch integration ----------------------------------------------------------------------


def test_torch_ops_opcheck():
    """torch.library.opcheck: schema, fake kernels, autograd registration, AOT dispatch. The
    schema check compares inputs with arithmetic torch lacks for fp8 on CPU, so ops reading fp8
    skip that one check (their fp8-free variants run it)."""
    x = torch.randn(9, 64)
    w, w_scale, _ = make_weight("e4m3fn", "row", 33, 64, "cpu")
    w16, _, _ = make_weight("bf16", None, 33, 64, "cpu")
    q8, _, _ = make_weight("q8_0", None, 33, 64, "cpu")
    a = torch.randn(5, 64, dtype=torch.bfloat16)
    matmul = torch.ops.kiln.matmul.default
    fp8_free = [
        (torch.ops.kiln.quantize_fp8.default, (x, torch.float8_e4m3fn, "row")),
        (torch.ops.kiln.quantize_fp8_scaled.default,
         (x, torch.tensor([0.5]), torch.float8_e5m2, "tensor")),
        (torch.ops.kiln.quantize_q8_0.default, (x,)),
        (torch.ops.kiln.dequantize.default, (q8, None, torch.float16)),
        (matmul, (a, w16, "bf16", 33, 64, None, "row_major", None, None, torch.float32, "auto")),
        (matmul, (a, q8, "q8_0", 33, 64, None, "row_major", None, a[0, :33], torch.bfloat16,
                  "auto")),
    ]
    gate, residual = torch.randn(5, 33), torch.randn(5, 33, dtype=torch.bfloat16)
    fp8_free.append((matmul, (a, w16, "bf16", 33, 64, None, "row_major", None, None,
                              torch.float32, "auto", gate, residual)))
    for op, args in fp8_free:
        torch.library.opcheck(op, args)
    fp8_inputs = [
        (torch.ops.kiln.dequantize.default, (w, w_scale, torch.bfloat16)),
        (matmul, (a, w, "f8_e4m3fn", 33, 64, w_scale, "row_major", None, None, torch.float32,
                  "auto")),
    ]
    for op, args in fp8_inputs:
        torch.library.opcheck(op, args, test_utils=("test_faketensor",
                                                    "test_autograd_registration",
                                                    "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph():
    w, w_scale, w64 = make_weight("e4m3fn", "row", 48, 64, "cpu")
    gate, residual = torch.randn(2, 48), torch.randn(2, 7, 48)

    def f(a):
        q, s = kiln.quantize_fp8(a, "e4m3fn", "row")
        back = kiln.dequantize(q, s, out_dtype=torch.float32)
        return kiln.matmul(back, w, w_scale=w_scale, out_dtype=torch.float32, gate=gate,
                           residual=residual)

    a = torch.randn(2, 7, 64)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(a), f(a), rtol=0, atol=0)


# ---- errors ---------------------------------------------------------------------------------


def test_errors_name_op_argument_expected_and_got():
    w, w_scale, _ = make_weight("e4m3fn", "row", 16, 64, "cpu")
    invalid = kiln.InvalidArgumentError
    with pytest.raises(invalid, match=r"kiln::matmul: a has shape \[3, 60\].*K = 64"):
        kiln.matmul(torch.randn(3, 60), w, w_scale=w_scale)
    with pytest.raises(kiln.InvalidArgumentError, match=r"kiln::quantize_q8_0: x has 48 columns"):
        kiln.quantize_q8_0(torch.randn(2, 48))
    with pytest.raises(kiln.InvalidArgumentError, match=r"kiln::quantize_fp8: fmt is 'e3m4'"):
        kiln.quantize_fp8(torch.randn(2, 48), "e3m4")
    with pytest.raises(kiln.InvalidArgumentError, match=r"kiln::quantize_fp8: granularity"):
        kiln.quantize_fp8(torch.randn(2, 48), "e4m3fn", "column")
    with pytest.raises(kiln.InvalidArgumentError, match=r"kiln::matmul: w is f32"):
        kiln.matmul(torch.randn(3, 64), torch.randn(16, 64))
    with pytest.raises(kiln.InvalidArgumentError, match=r"kiln::matmul: w_scale given with a bf16"):
        kiln.matmul(torch.randn(3, 64), torch.randn(16, 64).bfloat16(), w_scale=1.0)
    with pytest.raises(invalid, match=r"kiln::dequantize: q is uint8 with a scale"):
        kiln.dequantize(torch.zeros(2, 34, dtype=torch.uint8), torch.ones(1))
    with pytest.raises(kiln.InvalidArgumentError, match=r"kiln::dequantize: out_dtype is bf16"):
        kiln.dequantize(np.zeros((2, 34), dtype=np.uint8), out_dtype="bf16")
    with pytest.raises(kiln.InvalidArgumentError, match=r"kiln::matmul: path is 'fast'"):
        kiln.matmul(torch.randn(3, 64), w, w_scale=w_scale, path="fast")
    with pytest.raises(kiln.KilnError, match=r"kiln::.*scale"):  # [N] expected, [N + 1] given
        kiln.matmul(torch.randn(3, 64), w, w_scale=torch.ones(17))
    with pytest.raises(kiln.InvalidArgumentError, match=r"kiln::matmul: a is a builtins.list"):
        kiln.matmul([[1.0]], w)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_matches_cpu_reference_bitwise_for_dequantize():
    q, scale = kiln.quantize_fp8(torch.randn(64, 300), "e5m2", "block")
    cpu = kiln.dequantize(q, scale, out_dtype=torch.bfloat16)
    gpu = kiln.dequantize(q.cuda(), scale.cuda(), out_dtype=torch.bfloat16)
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without a CUDA device")
def test_bench_matmul_on_cpu(tmp_path):
    """Without a GPU the matmul suite times the CPU backend at small sizes, checks every peer's
    output against kiln's first, and writes its JSON."""
    env = dict(os.environ, KILN_CACHE_DIR=str(tmp_path / "cache"), OUT=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "kiln", "bench", "matmul", "--reps", "2", "--warmup", "1",
         "--no-chart"], env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "bench_matmul.json").read_text())
    cases = [(m["format"], m["m"], m.get("epilogue")) for m in record["measurements"]]
    assert ("fp8 w", 1, None) in cases and ("q8_0 w", 8, None) in cases
    assert ("fp8 x fp8", 512, None) in cases
    # kiln.matmul's gate / residual epilogue against kiln without it + the epilogue in torch
    assert ("fp8 x fp8", 48, "+gate+residual") in cases
    assert ("q8_0 w", 1, "+residual") in cases and ("bf16 w", 1, "+residual") in cases
    assert [c["passed"] for c in record["checks"]] == [True]  # no case failed
    for m in record["measurements"]:
        assert m["kiln_ms"] > 0 and m["auto_path"] == "reference"
        if "epilogue" in m:
            assert m["peers_ms"]["kiln + torch epilogue"] > 0
        else:
            assert m["peers_ms"]["bf16 matmul"] > 0 and m["peers_ms"]["dequant+matmul"] > 0
