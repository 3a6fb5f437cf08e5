"""`kiln bench` without torch: each suite's ops once on small numpy arrays, against the same math
done by numpy in f64. This is what the main job (scripts/run.sh) can do on a machine with no GPU
where torch is not installed (PyPI's Linux torch brings ~5 GB of CUDA wheels): a smoke test that
the build loads and computes, not a measurement.

Each result is a Check of the relative Frobenius error against the op's bound (the rounding of its
output dtype, or of the format for quantization), printed with its seed.
"""

import secrets

import numpy as np

from .. import attention, conv2d, dequantize, matmul, quantize_fp8, quantize_q8_0, rope_flux


def _error(got, want) -> float:
    want = np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(got, dtype=np.float64) - want) /
                 max(np.linalg.norm(want), 1e-30))


def _rope(rng) -> list:
    x = rng.standard_normal((2, 16, 3, 64)).astype(np.float32)  # [N, L, H, D]
    angle = rng.uniform(0, 2 * np.pi, (16, 32))
    cos, sin = np.cos(angle), np.sin(angle)
    pe = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # [L, D/2, 2, 2]
    got = rope_flux(x, pe.astype(np.float32))
    pairs = x.astype(np.float64).reshape(2, 16, 3, 32, 2)
    want = np.einsum("lprc,nlhpc->nlhpr", pe, pairs).reshape(x.shape).transpose(0, 2, 1, 3)
    return [("rope_flux f32", _error(got, want), 1e-6)]


def _attention(rng) -> list:
    q = rng.standard_normal((1, 4, 8, 64)).astype(np.float16)
    k = rng.standard_normal((1, 2, 12, 64)).astype(np.float16)  # GQA 4:2
    v = rng.standard_normal((1, 2, 12, 64)).astype(np.float16)
    got = attention(q, k, v)
    k64 = np.repeat(k.astype(np.float64), 2, axis=1)
    v64 = np.repeat(v.astype(np.float64), 2, axis=1)
    s = q.astype(np.float64) @ k64.transpose(0, 1, 3, 2) / 8.0
    p = np.exp(s - s.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ v64
    return [("attention f16 GQA", _error(got, want), 2e-3)]


def _conv2d(rng) -> list:
    x = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    got = conv2d(x, w, bias, padding=1)
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    want = np.einsum("nchwij,ocij->nohw", windows, w.astype(np.float64)) + bias[:, None, None]
    return [("conv2d f32 3x3 pad 1", _error(got, want), 1e-6)]


def _matmul(rng) -> list:
    w = rng.standard_normal((48, 256)).astype(np.float32)
    a = rng.standard_normal((3, 256)).astype(np.float32)
    blocks = quantize_q8_0(w)
    w_q8 = dequantize(blocks)
    codes, scale = quantize_fp8(w, "e4m3fn", "row")
    w_fp8 = dequantize(codes, scale, fmt="e4m3fn")
    return [
        ("quantize_q8_0 round trip", _error(w_q8, w), 0.01),
        ("quantize_fp8 e4m3fn round trip", _error(w_fp8, w), 0.05),
        ("matmul q8_0", _error(matmul(a, blocks), a.astype(np.float64) @ w_q8.T), 1e-6),
        ("matmul e4m3fn", _error(matmul(a, codes, w_scale=scale, w_fmt="e4m3fn"),
                                 a.astype(np.float64) @ w_fp8.T), 1e-6),
    ]


CHECKS = {"rope": _rope, "attention": _attention, "conv2d": _conv2d, "matmul": _matmul}


def run(bench, name: str) -> None:
    """Adds the smoke checks of suite `name` to `bench` (none for suites without ops)."""
    if name not in CHECKS:
        bench.log("no op to smoke-test without torch: skipped")
        return
    seed = secrets.randbits(31)
    bench.log(f"without torch: {name}'s ops on numpy arrays against numpy (seed {seed})")
    for label, error, bound in CHECKS[name](np.random.default_rng(seed)):
        bench.check(label, error, "rel err", bound)
