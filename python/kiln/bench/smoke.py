"""`kiln bench` without torch: each suite's ops once on small numpy arrays, against the same math
done by numpy in f64. This is what the main job (scripts/run.sh) can do on a machine with no GPU
where torch is not installed (PyPI's Linux torch brings ~5 GB of CUDA wheels): a smoke test that
the build loads and computes, not a measurement.

Each result is a Check of the relative Frobenius error against the op's bound (the rounding of its
output dtype, or of the format for quantization), printed with its seed.
"""

import secrets

import numpy as np

from .. import (attention, conv2d, dequantize, gelu_tanh, glu, group_norm, layer_norm, matmul,
               quantize_fp8, quantize_q8_0, rms_norm, rope_flux)


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


def _norm(rng) -> list:
    x = rng.standard_normal((2, 7, 96)).astype(np.float32)
    weight, bias = rng.standard_normal(96).astype(np.float32), rng.standard_normal(96)
    shift, scale = rng.standard_normal((2, 96)), rng.standard_normal((2, 96))
    x64 = x.astype(np.float64)
    rms = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * weight
    centered = x64 - x64.mean(-1, keepdims=True)
    ln = centered / np.sqrt((centered ** 2).mean(-1, keepdims=True) + 1e-6) * weight + bias
    ada = ln * (1 + scale[:, None]) + shift[:, None]
    f32 = np.float32
    img = rng.standard_normal((2, 8, 5, 3)).astype(np.float32)
    grouped = img.astype(np.float64).reshape(2, 4, -1)
    grouped = (grouped - grouped.mean(-1, keepdims=True)) / np.sqrt(grouped.var(-1, keepdims=True)
                                                                     + 1e-6)
    gn = grouped.reshape(img.shape)
    return [
        ("rms_norm f32", _error(rms_norm(x, weight), rms), 1e-6),
        ("layer_norm f32 AdaLN", _error(layer_norm(x, weight, bias.astype(f32),
                                                   shift=shift.astype(f32),
                                                   scale=scale.astype(f32)), ada), 1e-6),
        ("group_norm f32 + SiLU", _error(group_norm(img, 4, silu=True), gn / (1 + np.exp(-gn))),
         1e-6),
    ]


def _activation(rng) -> list:
    x = rng.standard_normal((5, 2 * 48)).astype(np.float32)
    gate, up = x.astype(np.float64)[:, :48], x.astype(np.float64)[:, 48:]
    x64 = x.astype(np.float64)
    gelu = 0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3)))
    return [
        ("glu silu f32", _error(glu(x), gate / (1 + np.exp(-gate)) * up), 1e-6),
        ("gelu_tanh f32", _error(gelu_tanh(x), gelu), 1e-6),
    ]


CHECKS = {"rope": _rope, "attention": _attention, "conv2d": _conv2d, "norm": _norm,
          "activation": _activation, "matmul": _matmul}


def run(bench, name: str) -> None:
    """Adds the smoke checks of suite `name` to `bench` (none for suites without ops)."""
    if name not in CHECKS:
        bench.log("no op to smoke-test without torch: skipped")
        return
    seed = secrets.randbits(31)
    bench.log(f"without torch: {name}'s ops on numpy arrays against numpy (seed {seed})")
    for label, error, bound in CHECKS[name](np.random.default_rng(seed)):
        bench.check(label, error, "rel err", bound)
