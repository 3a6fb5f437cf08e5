"""kiln.rope (LLM RoPE, "normal" and "neox" rotations, QK-norm, KV-cache writes) against a plain
f64 torch formula, on every backend.

Errors are ||got - ref|| / ||ref|| against the f64 formula computed from the same (already
rounded) inputs, so the only error kiln may add is its f32 math and the final rounding to the
output dtype: the bound is twice that dtype's unit roundoff, plus f32 slack. Cache writes are
checked row by row, with the rows no token names poisoned beforehand and required unchanged.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

import kiln

from conftest import CUDA_REASON, HAS_CUDA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
F32_MATH = 1e-6
STYLES = ["normal", "neox"]
POISON = 1234.5  # exactly representable in every dtype here


def reference(x, positions, theta, style, norm_weight=None, eps=1e-6):
    """f64 [N, H, T, D]: per-head RMSNorm, then pair i = (2i, 2i+1) (normal) or (i, i + D/2)
    (neox) turned by positions * theta^(-2i/D)."""
    x64 = x.double().cpu()
    dim = x.shape[-1]
    if norm_weight is not None:
        x64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
        x64 = x64 * norm_weight.double().cpu()
    if theta is not None:
        i = torch.arange(dim // 2, dtype=torch.float64)
        angle = positions.double().cpu()[..., None] * theta ** (-2 * i / dim)  # [N, T, D/2]
        cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]  # [N, T, 1, D/2]
        if style == "normal":
            a, b = x64[..., 0::2], x64[..., 1::2]
            out = torch.empty_like(x64)
            out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        else:
            a, b = x64[..., : dim // 2], x64[..., dim // 2:]
            out = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
        x64 = out
    return x64.permute(0, 2, 1, 3)


def check_close(got, want, dtype):
    assert got.dtype == dtype
    got64 = got.double().cpu()
    assert got.shape == want.shape
    assert not got64.isnan().any(), "output holds NaN"
    norm = want.norm().item()
    assert norm > 0, "reference is all zeros: the test would pass vacuously"
    err = ((got64 - want).norm() / norm).item()
    bound = 2 * ROUNDOFF[dtype] + F32_MATH
    assert err <= bound, f"relative error {err:.3e} > {bound:.3e}"


def packed(n, t, heads, kv_heads, dim, dtype, device):
    """The Q and K slices of a packed QKV projection [N, T, Hq + 2 Hkv, D] (strided views)."""
    qkv = torch.randn(n, t, heads + 2 * kv_heads, dim, dtype=dtype, device=device)
    return qkv[:, :, :heads], qkv[:, :, heads:heads + kv_heads], qkv[:, :, heads + kv_heads:]


def random_positions(n, t, device, dtype=torch.int32, high=4096):
    return torch.randint(0, high, (n, t), dtype=dtype, device=device)


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("out_dtype", [None, *DTYPES], ids=lambda d: f"out={d}")
@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: f"x={d}")
@pytest.mark.parametrize("style", STYLES)
def test_dtypes_styles_norm(device, style, x_dtype, out_dtype, norm):
    q, _, _ = packed(2, 7, 4, 2, 64, x_dtype, device)
    positions = random_positions(2, 7, device)
    w = (1 + 0.25 * torch.randn(64, device=device)).to(torch.bfloat16) if norm else None
    got = kiln.rope(q, positions, theta=10000.0, style=style, norm_weight=w,
                    out_dtype=out_dtype)
    assert got.device == q.device and got.is_contiguous()
    check_close(got, reference(q, positions, 10000.0, style, w), out_dtype or x_dtype)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(
    "n, t, heads, dim",
    [(1, 1, 1, 2), (1, 1, 32, 128), (1, 5, 3, 6), (2, 3, 5, 34), (1, 17, 8, 128),
     (3, 9, 2, 256), (1, 33, 7, 64), (2, 1, 1, 18)],
)
def test_shapes(device, style, n, t, heads, dim):
    q, _, _ = packed(n, t, heads, 1, dim, torch.bfloat16, device)
    positions = random_positions(n, t, device)
    w = torch.randn(dim, device=device)
    got = kiln.rope(q, positions, theta=500000.0, style=style, norm_weight=w, eps=1e-5)
    check_close(got, reference(q, positions, 500000.0, style, w, 1e-5), torch.bfloat16)


@pytest.mark.parametrize("style", STYLES)
def test_large_positions_exact_angles(device, style):
    """Positions up to 2^20: the angles are exact in f64, so the f32 output keeps its bound
    (an f32 angle at position 32768 would be off by 2^-9 rad)."""
    q, _, _ = packed(1, 9, 2, 1, 128, torch.float32, device)
    positions = torch.tensor([[0, 1, 4095, 4096, 32767, 32768, 131071, 1 << 20, 999983]],
                             dtype=torch.int64, device=device)
    got = kiln.rope(q, positions, theta=1e6, style=style)
    check_close(got, reference(q, positions, 1e6, style), torch.float32)


def test_negative_positions_rotate_backwards(device):
    q, _, _ = packed(1, 4, 2, 1, 32, torch.float32, device)
    positions = torch.tensor([[-3, -1, 0, 5]], dtype=torch.int32, device=device)
    got = kiln.rope(q, positions, theta=10000.0)
    check_close(got, reference(q, positions, 10000.0, "normal"), torch.float32)


def test_no_rotation_is_norm_and_permute(device):
    q, _, _ = packed(2, 5, 3, 1, 64, torch.float32, device)
    positions = random_positions(2, 5, device)
    got = kiln.rope(q, positions, theta=None)
    assert torch.equal(got, q.permute(0, 2, 1, 3))
    w = torch.randn(64, device=device)
    got = kiln.rope(q, positions, theta=None, norm_weight=w, style="neox")
    check_close(got, reference(q, positions, None, "neox", w), torch.float32)


def test_strided_inputs(device):
    """x transposed in memory, positions a column slice, the norm weight a fresh copy: the same
    answer as contiguous inputs."""
    n, t, heads, dim = 2, 9, 3, 64
    x = torch.randn(n, heads, t, dim, device=device).transpose(1, 2)  # [N, T, H, D] view
    positions = random_positions(n, 2 * t, device)[:, ::2]  # stride 2 along T
    want = reference(x, positions, 10000.0, "neox")
    check_close(kiln.rope(x, positions, theta=10000.0, style="neox"), want, torch.float32)
    check_close(kiln.rope(x.contiguous(), positions.contiguous(), theta=10000.0, style="neox"),
                want, torch.float32)


def test_eps_is_used(device):
    x = torch.randn(1, 3, 2, 64, device=device) * 1e-2
    w = torch.ones(64, device=device)
    positions = random_positions(1, 3, device)
    got = kiln.rope(x, positions, theta=10000.0, norm_weight=w, eps=1.0)
    check_close(got, reference(x, positions, 10000.0, "normal", w, 1.0), torch.float32)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("style", STYLES)
def test_cache_write_at_positions(device, style, cache_dtype):
    """K rotated and V copied into [N, H, S, D] caches at the positions; untouched rows keep
    their poison, and a cache that is a slice of a larger buffer is written in place."""
    n, t, heads, kv_heads, dim, length = 2, 5, 4, 2, 64, 37
    _, k, v = packed(n, t, heads, kv_heads, dim, torch.bfloat16, device)
    positions = torch.stack([torch.randperm(length, device=device)[:t] for _ in range(n)])
    positions = positions.to(torch.int32)
    w = 1 + 0.25 * torch.randn(dim, device=device)
    # The caches: views into buffers with room around them (guard bands on every side).
    k_buffer = torch.full((n, kv_heads + 2, length + 3, dim), POISON, dtype=cache_dtype,
                          device=device)
    v_buffer = k_buffer.clone()
    k_cache, v_cache = k_buffer[:, 1:-1, 2:-1], v_buffer[:, 1:-1, 2:-1]
    assert kiln.rope(k, positions, theta=1e6, style=style, norm_weight=w,
                     cache=k_cache) is None
    assert kiln.rope(v, positions, theta=None, cache=v_cache) is None

    want_k = reference(k, positions, 1e6, style, w)  # [N, Hkv, T, D]
    want_v = reference(v, positions, None, style)
    written = torch.zeros(n, length, dtype=torch.bool)
    for b in range(n):
        rows = positions[b].long().cpu()
        written[b, rows] = True
        check_close(k_cache[b][:, rows], want_k[b], cache_dtype)
        check_close(v_cache[b][:, rows], want_v[b], cache_dtype)
    for buffer, cache in ((k_buffer, k_cache), (v_buffer, v_cache)):
        mask = torch.ones(buffer.shape[:3], dtype=torch.bool)
        mask[:, 1:-1, 2:-1] = ~written[:, None, :].expand(n, kv_heads, length)
        untouched = buffer.cpu()[mask]
        assert untouched.numel() > 0
        assert (untouched == POISON).all(), "rows no token names were written"


def test_cache_decode_step_matches_prefill(device):
    """One token at position p written into a cache equals row p of a prefill's write."""
    n, kv_heads, dim, length = 1, 2, 128, 16
    _, k, _ = packed(n, length, 4, kv_heads, dim, torch.bfloat16, device)
    all_pos = torch.arange(length, dtype=torch.int32, device=device).view(1, length)
    prefill = torch.zeros(n, kv_heads, length, dim, dtype=torch.bfloat16, device=device)
    kiln.rope(k, all_pos, theta=500000.0, cache=prefill)
    steps = torch.zeros_like(prefill)
    for p in range(length):
        kiln.rope(k[:, p:p + 1], all_pos[:, p:p + 1], theta=500000.0, cache=steps)
    assert torch.equal(steps, prefill)


def test_zero_sizes(device):
    positions = torch.zeros(1, 0, dtype=torch.int32, device=device)
    x = torch.randn(1, 0, 4, 64, device=device)
    assert kiln.rope(x, positions, theta=10000.0).shape == (1, 4, 0, 64)
    cache = torch.full((1, 4, 8, 64), POISON, device=device)
    kiln.rope(x, positions, theta=10000.0, cache=cache)
    assert (cache == POISON).all()
    x = torch.randn(2, 3, 0, 64, device=device)
    assert kiln.rope(x, random_positions(2, 3, device), theta=10000.0).shape == (2, 0, 3, 64)


def test_opcheck():
    q, k, _ = packed(1, 5, 4, 2, 64, torch.bfloat16, "cpu")
    positions = random_positions(1, 5, "cpu", high=8)
    w = torch.randn(64)
    torch.library.opcheck(torch.ops.kiln.rope.default,
                          (q, positions, 10000.0, "neox", w, 1e-6, torch.float32))
    cache = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.kiln.rope_cache.default,
                          (k, positions, cache, 10000.0, "normal", None, 1e-6))


def test_torch_compile_fullgraph():
    """Both ops sit in a torch.compile graph with no graph break (CPU, inductor)."""

    def qk(qkv, positions, k_cache):
        q = kiln.rope(qkv[:, :, :4], positions, theta=10000.0, style="neox")
        kiln.rope(qkv[:, :, 4:6], positions, theta=10000.0, style="neox", cache=k_cache)
        return q * 2

    qkv = torch.randn(1, 6, 8, 64, dtype=torch.bfloat16)
    positions = torch.arange(6, dtype=torch.int32).view(1, 6)
    k_cache = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    q = torch.compile(qk, fullgraph=True, dynamic=False)(qkv, positions, k_cache)
    check_close(q / 2, reference(qkv[:, :, :4], positions, 10000.0, "neox"), torch.bfloat16)
    check_close(k_cache[:, :, :6], reference(qkv[:, :, 4:6], positions, 10000.0, "neox"),
                torch.bfloat16)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy(dtype):
    x = np.random.randn(2, 5, 3, 32).astype(dtype)
    # Distinct positions per sequence: the cache rows they name are all written.
    positions = np.stack([np.random.permutation(100)[:5] for _ in range(2)]).astype(np.int64)
    got = kiln.rope(x, positions, theta=10000.0, style="neox")
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.flags.c_contiguous
    want = reference(torch.from_numpy(x), torch.from_numpy(positions), 10000.0, "neox")
    check_close(torch.from_numpy(got), want, torch.from_numpy(got).dtype)
    cache = np.full((2, 3, 100, 32), POISON, dtype=np.float32)
    assert kiln.rope(x, positions, theta=10000.0, style="neox", cache=cache) is None
    for b in range(2):
        check_close(torch.from_numpy(cache[b][:, positions[b]]), want[b], torch.float32)


def test_numpy_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, kiln\n"
        "x = np.random.randn(1, 5, 2, 64).astype(np.float32)\n"
        "out = kiln.rope(x, np.zeros((1, 5), np.int32), theta=None)\n"
        "assert out.shape == (1, 2, 5, 64) and np.array_equal(out, x.transpose(0, 2, 1, 3))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
def test_cuda_side_stream_and_graph_replay():
    """CUDA work goes on torch's current stream, and a captured graph reads new positions from
    the device tensor on each replay."""
    _, k, _ = packed(1, 1, 32, 8, 128, torch.bfloat16, "cuda")
    positions = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
    cache = torch.zeros(1, 8, 64, 128, dtype=torch.bfloat16, device="cuda")
    kiln.rope(k, positions, theta=500000.0, cache=cache)  # compiles before capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            kiln.rope(k, positions, theta=500000.0, cache=cache)
    for p in (3, 17, 63):
        positions.fill_(p)
        graph.replay()
    torch.cuda.synchronize()
    for p in (3, 17, 63):
        want = reference(k, torch.tensor([[p]]), 500000.0, "normal")[0, :, 0]
        check_close(cache[0, :, p], want, torch.bfloat16)


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
def test_cuda_skips_positions_outside_the_cache():
    """CUDA cannot raise on device data: rows whose position lies outside [0, S) are skipped."""
    _, k, _ = packed(1, 3, 1, 1, 64, torch.bfloat16, "cuda")
    positions = torch.tensor([[1, 8, -1]], dtype=torch.int32, device="cuda")
    cache = torch.full((1, 1, 8, 64), POISON, dtype=torch.bfloat16, device="cuda")
    kiln.rope(k, positions, theta=None, cache=cache)
    assert torch.equal(cache[0, 0, 1], k[0, 0, 0])
    mask = torch.ones(8, dtype=torch.bool)
    mask[1] = False
    assert (cache[0, 0][mask] == POISON).all()


# ---- bad arguments ---------------------------------------------------------------------------


def test_odd_head_dim():
    with pytest.raises(kiln.InvalidArgumentError, match=r"kiln::rope: x has head dim D = 63") as e:
        kiln.rope(torch.randn(1, 4, 2, 63), torch.zeros(1, 4, dtype=torch.int32), theta=1e4)
    assert e.value.code == "invalid_argument"


def test_positions_shape_and_dtype():
    x = torch.randn(2, 4, 2, 64)
    with pytest.raises(kiln.InvalidArgumentError, match=r"rope: positions has shape \[4\]"):
        kiln.rope(x, torch.zeros(4, dtype=torch.int32), theta=1e4)
    with pytest.raises(kiln.InvalidArgumentError, match=r"rope: positions .*f32"):
        kiln.rope(x, torch.zeros(2, 4), theta=1e4)


def test_positions_outside_the_cache_raise_on_cpu():
    x = torch.randn(1, 2, 2, 64)
    cache = torch.zeros(1, 2, 8, 64)
    with pytest.raises(kiln.InvalidArgumentError,
                       match=r"rope_cache: positions\[0, 1\] = 8, expected .*\[0, 8\)"):
        kiln.rope(x, torch.tensor([[0, 8]], dtype=torch.int32), theta=1e4, cache=cache)


def test_cache_shape_and_stride():
    x = torch.randn(1, 2, 2, 64)
    positions = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(kiln.InvalidArgumentError, match=r"rope_cache: cache has shape"):
        kiln.rope(x, positions, theta=1e4, cache=torch.zeros(1, 3, 8, 64))
    with pytest.raises(kiln.InvalidArgumentError, match=r"rope_cache: cache .*unit stride in D"):
        kiln.rope(x, positions, theta=1e4, cache=torch.zeros(1, 2, 64, 8).transpose(2, 3))
    with pytest.raises(kiln.InvalidArgumentError, match="out_dtype is given with a cache"):
        kiln.rope(x, positions, theta=1e4, cache=torch.zeros(1, 2, 8, 64), out_dtype="bf16")


@pytest.mark.parametrize("theta", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_theta(theta):
    with pytest.raises(kiln.InvalidArgumentError, match=r"rope: theta = .*expected a finite"):
        kiln.rope(torch.randn(1, 2, 2, 64), torch.zeros(1, 2, dtype=torch.int32), theta=theta)


def test_bad_style_and_norm_weight():
    x = torch.randn(1, 2, 2, 64)
    positions = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(kiln.InvalidArgumentError, match=r"rope: style is 'gptj'"):
        kiln.rope(x, positions, theta=1e4, style="gptj")
    with pytest.raises(kiln.InvalidArgumentError, match=r"rope: norm_weight has shape \[32\]"):
        kiln.rope(x, positions, theta=1e4, norm_weight=torch.ones(32))


def test_x_must_be_4d():
    with pytest.raises(kiln.InvalidArgumentError, match=r"rope: x has shape \[4, 64\]"):
        kiln.rope(torch.randn(4, 64), torch.zeros(1, 4, dtype=torch.int32), theta=1e4)
